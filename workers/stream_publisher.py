"""One publisher thread per worker process: token events of every running stream, coalesced.

Why a shared thread: a stream thread that published each token itself would spend one Redis
round trip per token and, when tokens arrive faster than that, fall behind the upstream (the
socket buffer fills, the upstream slows down). Here a stream thread only appends the token text
to its `StreamHandle` and goes back to reading. The publisher thread takes everything pending
for *all* streams and sends it in one pipelined round trip: one guarded EMIT script per stream
with that stream's pending text joined into one ``token`` event. When tokens are slower than a
round trip (the normal case) every token is its own event; tokens are joined only when they
arrived while the previous publish was in flight.

The EMIT script is guarded: it answers -1 once the request is terminal (cancelled by the API,
or failed by a sweep). The handle is then marked `stopped` and the stream thread closes the
upstream response on its next token, so no further tokens are paid for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from router import events as ev
from router.logs import get_logger
from router.store import StoreOps

log = get_logger(__name__)

# One attempt: a pipeline cut by a connection error may have run in part, and sending it again
# could duplicate tokens; a stream whose events cannot be published fails instead.
PUBLISH_ATTEMPTS = 1


class PublishError(RuntimeError):
    """Redis refused or could not be reached while publishing a stream's events."""


@dataclass(eq=False)
class StreamHandle:
    """What the publisher knows about one running stream."""

    request_id: str
    pending: list[str] = field(default_factory=list)
    inflight: bool = False
    stopped: bool = False
    last_seq: int = 0
    events_published: int = 0
    error: BaseException | None = None


class StreamPublisher:
    """Drains every stream's pending tokens in one pipelined round trip per wake-up."""

    def __init__(self, client: redis.Redis, ops: StoreOps) -> None:
        self.redis = client
        self.ops = ops
        self._cond = threading.Condition()
        self._handles: dict[str, StreamHandle] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="stream-publisher", daemon=True)
        self._thread.start()

    # --- stream threads ------------------------------------------------------------------------
    def open(self, request_id: str) -> StreamHandle:
        handle = StreamHandle(request_id)
        with self._cond:
            self._handles[request_id] = handle
        return handle

    def publish(self, handle: StreamHandle, content: str) -> None:
        """Queue one token's text; returns at once (the publisher thread sends it)."""
        if handle.error is not None:
            raise PublishError(f"publishing failed: {handle.error}") from handle.error
        with self._cond:
            handle.pending.append(content)
            self._cond.notify_all()

    def flush(self, handle: StreamHandle, timeout: float = 10.0) -> None:
        """Wait until everything queued for `handle` is in the replay log (or refused)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while handle.pending or handle.inflight:
                if handle.error is not None:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishError(f"publishing did not finish within {timeout}s")
                self._cond.wait(left)
        if handle.error is not None:
            raise PublishError(f"publishing failed: {handle.error}") from handle.error

    def close(self, handle: StreamHandle) -> None:
        with self._cond:
            self._handles.pop(handle.request_id, None)

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(5)

    # --- the publisher thread -------------------------------------------------------------------
    def _take_pending(self) -> dict[StreamHandle, list[str]] | None:
        with self._cond:
            while not self._closed:
                ready = [h for h in self._handles.values() if h.pending and not h.inflight]
                if ready:
                    batch = {}
                    for handle in ready:
                        batch[handle] = handle.pending
                        handle.pending = []
                        handle.inflight = True
                    return batch
                self._cond.wait()
            return None

    def _loop(self) -> None:
        while True:
            batch = self._take_pending()
            if batch is None:
                return
            results: list[Any] | None = None
            error: BaseException | None = None
            for attempt in range(1, PUBLISH_ATTEMPTS + 1):
                try:
                    results = self._send(batch)
                    break
                except redis.RedisError as exc:
                    error = exc
                    log.warning("publishing tokens failed", attempt=attempt, error=str(exc),
                                streams=len(batch))
                    time.sleep(0.05 * attempt)
            with self._cond:
                for i, handle in enumerate(batch):
                    handle.inflight = False
                    if results is None:
                        handle.error = error
                        continue
                    seq = int(results[i])
                    if seq < 0:
                        handle.stopped = True
                    else:
                        handle.last_seq = seq
                        handle.events_published += 1
                self._cond.notify_all()

    def _send(self, batch: dict[StreamHandle, list[str]]) -> list[Any]:
        """One round trip: a guarded EMIT per stream (EVALSHA, loading the script if needed)."""
        ops = [self.ops.emit(h.request_id, [ev.token("".join(parts))], guard=True)
               for h, parts in batch.items()]
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for op in ops:
                pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
            results: list[Any] = pipe.execute(raise_on_error=False)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                break
            self.redis.script_load(ops[0].script.source)
        for r in results:
            if isinstance(r, Exception):
                raise redis.RedisError(str(r))
        return results
