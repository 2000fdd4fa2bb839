"""Stopping a running stream's upstream read at once, from outside the stream.

A stream notices that its request became terminal (cancelled) when its next token's publish is
refused, or at its next chunk. That is too late when the upstream is slow or stalled: a revoke
must stop the upstream call within a second. The engine runs each stream inside an
`UpstreamAbort` scope (a context variable, so the upstream client finds it without being
passed anything); the upstream client binds the response it is reading to it. Firing the
abort closes that connection (the upstream sees the client go away and stops generating) and
ends the chunk iterator at once with an empty chunk, after which the stream sees its stop flag
(`hybrid_router.workers.stream.publisher.StreamPublisher.stop`) and ends ``cancelled`` as after any cancel,
with the tokens paid for recorded. Call `UpstreamAbort.fire` on the stream's event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

_current: ContextVar[UpstreamAbort | None] = ContextVar("hr_upstream_abort", default=None)


class UpstreamAbort:
    """The abort of one stream run: fired at most once, effective for every later attempt."""

    def __init__(self) -> None:
        self.fired = False
        self._close: Callable[[], None] | None = None

    def bind(self, close: Callable[[], None]) -> None:
        """The upstream response now being read is closed by `close` (at once if fired)."""
        self._close = close
        if self.fired:
            close()

    def unbind(self) -> None:
        self._close = None

    def fire(self) -> None:
        self.fired = True
        close, self._close = self._close, None
        if close is not None:
            close()

    def enter(self) -> object:
        """Make this the current stream's abort (for the rest of the calling task)."""
        return _current.set(self)


def current_abort() -> UpstreamAbort | None:
    """The abort of the stream running in this task, if it runs inside one."""
    return _current.get()
