"""One publisher per stream worker process: token events of every running stream, coalesced.

All streams of a process run on one asyncio loop (`workers.stream_engine`). A stream only
appends a token's text to its `StreamHandle` and goes back to reading its upstream; the
publisher task takes everything pending for *all* streams and sends it in one pipelined round
trip: one guarded EMIT script per stream, with that stream's pending text joined into one
``token`` event. A stream's first token goes out on the next turn of the loop; later tokens wait
up to `COALESCE_S` (2 ms) so that the tokens of many streams share one round trip. When tokens
are slower than that (the normal case) every token is still its own event; a stream's tokens
are joined only when they arrived within one such window or while the previous publish was in
flight. Why: a stream that published each token itself would spend
one Redis round trip per token, and hundreds of streams would each wait on their own.

The EMIT script is guarded: it answers -1 once the request is terminal (cancelled by the API,
or failed by a sweep). The handle is then marked `stopped` and the stream closes the upstream
response on its next chunk, so no further tokens are paid for.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis

from router import events as ev
from router.logs import get_logger
from router.redis_pipe import RedisPipe
from router.store import StoreOp, StoreOps

log = get_logger(__name__)

# A stream's later tokens wait at most this long for other streams' tokens to share their round
# trip (fewer Redis round trips and syscalls per token under load); a stream's first token and
# a flush never wait.
COALESCE_S = 0.002


class PublishError(RuntimeError):
    """Redis refused or could not be reached while publishing a stream's events."""


@dataclass(eq=False)
class StreamHandle:
    """What the publisher knows about one running stream."""

    request_id: str
    pending: list[ev.Produced] = field(default_factory=list)
    inflight: bool = False
    stopped: bool = False
    last_seq: int = 0
    events_published: int = 0
    error: BaseException | None = None


class StreamPublisher:
    """Drains every stream's pending tokens in one pipelined round trip per wake-up.

    Create it inside the running loop; `run()` is the publisher task. One attempt per batch: a
    pipeline cut by a connection error may have run in part, and sending it again could
    duplicate tokens, so a stream whose events cannot be published fails instead.
    """

    def __init__(self, client: aioredis.Redis, ops: StoreOps, pipe: RedisPipe | None = None) -> None:
        self.redis = client
        self.ops = ops
        self.pipe = pipe
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
    def open(self, request_id: str) -> StreamHandle:
        handle = StreamHandle(request_id)
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
                    lambda: handle.error is not None or not (handle.pending or handle.inflight))

        try:
            await asyncio.wait_for(drained(), timeout)
        except TimeoutError:
            raise PublishError(f"publishing did not finish within {timeout}s") from None
        if handle.error is not None:
            raise PublishError(f"publishing failed: {handle.error}") from handle.error

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
                    del self._ready[handle]
                    batch[handle] = handle.pending
                    handle.pending = []
                    handle.inflight = True
            if batch:
                await self._publish(batch)

    async def _publish(self, batch: dict[StreamHandle, list[ev.Produced]]) -> None:
        results: list[Any] | None = None
        error: BaseException | None = None
        try:
            results = await self._send(batch)
        except (redis.RedisError, OSError) as exc:
            error = exc
            log.warning("publishing tokens failed", error=str(exc), streams=len(batch))
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
            if handle.pending:  # arrived while this batch was in flight
                self._wake.set()
        async with self._sent:
            self._sent.notify_all()

    async def _send(self, batch: dict[StreamHandle, list[ev.Produced]]) -> list[Any]:
        """One round trip: a guarded EMIT per stream (EVALSHA, loading the script if needed)."""
        ops = [self.ops.emit(h.request_id, _events(parts), guard=True)
               for h, parts in batch.items()]
        if self.pipe is not None:
            return await self._send_raw(self.pipe, ops)
        results: list[Any] = []
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for op in ops:
                pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
            results = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                break
            await self.redis.script_load(ops[0].script.source)
        for r in results:
            if isinstance(r, Exception):
                raise redis.RedisError(str(r))
        return results

    async def _send_raw(self, pipe: RedisPipe, ops: list[StoreOp[int]]) -> list[Any]:
        commands = [("EVALSHA", op.script.sha, len(op.keys), *op.keys, *op.args) for op in ops]
        results = await pipe.execute(commands)
        if any(isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT") for r in results):
            # Nothing ran (every command is the same script): load it and send the batch again.
            await pipe.execute([("SCRIPT", "LOAD", ops[0].script.source)])
            results = await pipe.execute(commands)
        for r in results:
            if isinstance(r, hiredis.ReplyError):
                raise redis.ResponseError(str(r))
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
