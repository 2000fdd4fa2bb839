"""One publisher per stream worker process: token events of every running stream, coalesced.

All streams of a process run on one asyncio loop (`hybrid_router.workers.stream.engine`). A stream only
appends a token's text to its `StreamHandle` and goes back to reading its upstream; the
publisher task takes everything pending for *all* streams and sends it in one pipelined round
trip: one guarded EMIT script per stream, with that stream's pending text joined into one
``token`` event. A stream's first token goes out on the next turn of the loop; later tokens wait
up to `COALESCE_S` (2 ms) so that the tokens of many streams share one round trip. When tokens
are slower than that (the normal case) every token is still its own event; a stream's tokens
are joined only when they arrived within one such window or while the previous publish was in
flight. Why: a stream that published each token itself would spend
one Redis round trip per token, and hundreds of streams would each wait on their own.

The EMIT_TOKENS script is guarded: it answers -1 once the request is terminal (cancelled by the
API) and -2 when another worker owns the stream (it resumed it after this one was taken for
dead). The handle is then marked `stopped` (and `lost`) and the stream closes the upstream
response on its next chunk, so no further tokens are paid for.

Redis outages are ridden out: a batch whose round trip failed (Redis restarting, a connection
cut) is sent again, the same events first, with backoff, for up to
`Settings.stream_redis_grace_s`; the streams keep reading their upstream meanwhile and their
tokens wait here. Sending again is safe because each token event carries the count of tokens
its stream had relayed before it, and the script appends it only if the record still says that
count (a repeat of an event that did get in answers 0 and appends nothing).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.redis_io import RedisPipe, run_scripts
from hybrid_router.router.core.store import StoreOps

log = get_logger(__name__)

# A stream's later tokens wait at most this long for other streams' tokens to share their round
# trip (fewer Redis round trips and syscalls per token under load); a stream's first token and
# a flush never wait.
COALESCE_S = 0.002
RETRY_FIRST_S = 0.05  # first pause before a failed batch is sent again (doubling, up to 1 s)
RETRY_MAX_S = 1.0


class PublishError(RuntimeError):
    """Redis refused or could not be reached while publishing a stream's events."""


@dataclass(eq=False)
class StreamHandle:
    """What the publisher knows about one running stream."""

    request_id: str
    owner: str = ""  # the lease owner: the worker process that streams the request
    relayed: int = 0  # tokens the replay log holds for the request (confirmed by Redis)
    pending: list[ev.Produced] = field(default_factory=list)
    unconfirmed: list[ev.Produced] | None = None  # a batch whose round trip failed: sent again
    inflight: bool = False
    stopped: bool = False
    lost: bool = False  # another worker owns the stream: write nothing more
    last_seq: int = 0
    events_published: int = 0
    error: BaseException | None = None


class StreamPublisher:
    """Drains every stream's pending tokens in one pipelined round trip per wake-up.

    Create it inside the running loop; `run()` is the publisher task. A batch cut by a
    connection error may have run in part; it is sent again as it was (see the module doc).
    """

    def __init__(self, ops: StoreOps, pipe: RedisPipe) -> None:
        self.ops = ops
        self.pipe = pipe
        self.grace_s = ops.settings.stream_redis_grace_s
        self._outage_since: float | None = None
        self._retry_pause = RETRY_FIRST_S
        self._retry_at = 0.0  # loop time before which a failed batch is not sent again
        self._handles: dict[str, StreamHandle] = {}
        # Handles with pending text, in arrival order (a dict as an ordered set): a wake-up
        # looks only at streams that have something to send, not at every running stream.
        self._ready: dict[StreamHandle, None] = {}
        self._wake = asyncio.Event()
        self._sent = asyncio.Condition()
        self._closed = False
        self._urgent = False
        self._hold: asyncio.Future[None] | None = None

    # --- streams ---------------------------------------------------------------------------------
    def open(self, request_id: str, owner: str, relayed: int = 0) -> StreamHandle:
        """A handle for a stream this worker owns (`owner`: its lease owner); `relayed`: the
        tokens the replay log already holds (a resumed stream)."""
        handle = StreamHandle(request_id, owner=owner, relayed=relayed)
        self._handles[request_id] = handle
        return handle

    def publish(self, handle: StreamHandle, content: ev.Produced) -> None:
        """Queue one token's text (or one chunk's tool-call deltas); the publisher task sends
        it on its next turn."""
        if handle.error is not None:
            raise PublishError(f"publishing failed: {handle.error}") from handle.error
        handle.pending.append(content)
        self._ready[handle] = None
        if handle.events_published == 0 and not handle.inflight:
            self._expedite()  # a first token: the subscriber's time to first token
        self._wake.set()

    def _expedite(self) -> None:
        self._urgent = True
        if self._hold is not None and not self._hold.done():
            self._hold.set_result(None)

    async def flush(self, handle: StreamHandle, timeout: float = 10.0) -> None:
        """Wait until everything queued for `handle` is in the replay log (or refused)."""
        if handle.pending:
            self._expedite()

        async def drained() -> None:
            async with self._sent:
                await self._sent.wait_for(
                    lambda: handle.error is not None or handle.stopped
                    or not (handle.pending or handle.inflight or handle.unconfirmed))

        try:
            await asyncio.wait_for(drained(), timeout)
        except TimeoutError:
            raise PublishError(f"publishing did not finish within {timeout}s") from None
        if handle.error is not None:
            raise PublishError(f"publishing failed: {handle.error}") from handle.error

    def stop(self, request_id: str) -> bool:
        """Mark `request_id`'s running stream stopped (its request was made terminal
        elsewhere, e.g. revoked): it ends at its next chunk. False if it does not run here."""
        handle = self._handles.get(request_id)
        if handle is None:
            return False
        handle.stopped = True
        return True

    def close(self, handle: StreamHandle) -> None:
        self._handles.pop(handle.request_id, None)
        self._ready.pop(handle, None)

    def shutdown(self) -> None:
        self._closed = True
        self._expedite()
        self._wake.set()

    # --- the publisher task ----------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wake.wait()
            if self._retry_at > loop.time():  # Redis is out of reach: wait out the pause
                await asyncio.sleep(self._retry_at - loop.time())
            if self._urgent:
                # One more turn of the loop: tokens of other streams that arrived in the same
                # read of the sockets are appended meanwhile and go out in this batch.
                await asyncio.sleep(0)
            else:
                self._hold = hold = loop.create_future()
                timer = loop.call_later(COALESCE_S, _release, hold)
                await hold
                timer.cancel()
                self._hold = None
            self._urgent = False
            self._wake.clear()
            batch = {}
            for handle in list(self._ready):
                if not handle.inflight:  # an in-flight one stays ready for the next batch
                    batch[handle] = self._take(handle)
            if batch:
                await self._publish(batch)

    def _take(self, handle: StreamHandle) -> list[ev.Produced]:
        """What `handle` sends in this batch: a batch that failed, again and alone, else
        everything pending."""
        handle.inflight = True
        del self._ready[handle]
        if handle.unconfirmed is not None:
            return handle.unconfirmed
        parts, handle.pending = handle.pending, []
        return parts

    async def _publish(self, batch: dict[StreamHandle, list[ev.Produced]]) -> None:
        try:
            results = await self._send(batch)
        except (redis.RedisError, OSError) as exc:
            self._failed(batch, exc)
        else:
            self._outage_since, self._retry_pause = None, RETRY_FIRST_S
            for handle, result in zip(batch, results, strict=True):
                self._settle(handle, batch[handle], int(result))
        async with self._sent:
            self._sent.notify_all()

    def _settle(self, handle: StreamHandle, parts: list[ev.Produced], seq: int) -> None:
        handle.inflight = False
        handle.unconfirmed = None
        if seq == -2:
            handle.lost = handle.stopped = True
            log.warning("stream taken over by another worker; stopping", request_id=handle.request_id)
        elif seq < 0:
            handle.stopped = True
        else:
            handle.relayed += len(parts)
            handle.events_published += 1
            if seq > 0:
                handle.last_seq = seq
        if handle.pending:  # arrived while this batch was in flight
            self._ready[handle] = None
            self._wake.set()

    def _failed(self, batch: dict[StreamHandle, list[ev.Produced]], exc: BaseException) -> None:
        """Keep a failed batch to send again after a pause, or give up once Redis has been
        out of reach for longer than the grace period."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        give_up = now - self._outage_since > self.grace_s
        log.warning("publishing tokens failed", error=str(exc), streams=len(batch),
                    retry_in_s=None if give_up else self._retry_pause)
        for handle, parts in batch.items():
            handle.inflight = False
            if give_up:
                handle.error = exc
            else:
                handle.unconfirmed = parts
                self._ready[handle] = None
        if not give_up:
            loop = asyncio.get_running_loop()
            self._retry_at = loop.time() + self._retry_pause
            loop.call_later(self._retry_pause, self._wake.set)
            self._retry_pause = min(RETRY_MAX_S, self._retry_pause * 2)

    async def _send(self, batch: dict[StreamHandle, list[ev.Produced]]) -> list[Any]:
        """One round trip: a guarded EMIT per stream (EVALSHA, loading the script if needed)."""
        ops = [self.ops.emit_tokens(h.request_id, h.owner, h.relayed, len(parts),
                                    _events(parts))
               for h, parts in batch.items()]
        results = await run_scripts(self.pipe, [(op.script, op.keys, op.args) for op in ops])
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results


def _events(parts: list[ev.Produced]) -> list[str]:
    """A stream's pending parts as events: all text (the usual case) is one ``token`` event."""
    texts = [part for part in parts if isinstance(part, str)]
    if len(texts) == len(parts):
        return [ev.token("".join(texts))]
    return ev.produced_events(parts)


def _release(hold: asyncio.Future[None]) -> None:
    if not hold.done():
        hold.set_result(None)
