"""The stream engine: every stream of a worker process on one asyncio loop, fed straight from
the stream queue.

Why: with a thread per stream, each new stream paid Celery's consumer (one message at a time,
milliseconds each: kombu's ack bookkeeping, the task request, the thread hand-off, the tracer) and
then competed for the GIL with every other stream's token relay; a burst of new streams delayed
both their first tokens and the running streams' next ones. Here one loop (uvloop when
installed) owns an async Redis pool, one upstream connection pool and the coalescing publisher,
and a consumer task takes stream task messages off the stream queue's Redis list itself (onto
its taken list, see "Delivery"), so starting a stream is one move, one claim script and one
upstream request.

The messages are ordinary Celery task messages (``hr.stream.run``, args ``[request_id]``, the
task id being the request id): the intake writes them atomically with the record, the sweep
sends a lost one again with ``send_task`` and runs a stream it takes over here. Any Celery
worker consuming the stream queue runs this engine on it (`hybrid_router.workers.stream.bootstep`). For Flower
and Celery's ``inspect`` / ``revoke``, each stream is reported as the task Celery would have run
(`hybrid_router.workers.stream.task_view`: task events from their own thread, off the hot path; the worker
state; ``revoke --terminate``).

Delivery: a message is moved, not popped, off the queue: ``RPOPLPUSH`` onto the engine's own
taken list (`Keys.stream_taken`), and the claim script removes it from there. Each engine keeps
a heartbeat (`Keys.stream_engine_alive`, half of ``Settings.stream_lease_s``, renewed every
second); every engine looks once a second for engines whose heartbeat is gone and hands
their taken messages back to the queue (`RESTORE_TAKEN`), so a worker killed between taking a
message and claiming it delays that request by less than the lease. After the claim, the lease
covers it (see `hybrid_router.workers.stream.claim`), and the sweep (`hybrid_router.workers.stream.sweep`, run here too)
resumes a stream whose worker died. Exactly-once upstream calls come from the claim either way.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import os
import socket
import threading
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
import redis

from hybrid_router.router.core.celery_app import STREAM_TASK
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.lua import RESTORE_TAKEN_SCRIPT, TAKE_SCRIPT
from hybrid_router.router.core.redis_io import RedisPipe, raise_errors, run_scripts
from hybrid_router.router.core.replay import compact_due
from hybrid_router.router.core.task_events import EventSink, TaskEvents
from hybrid_router.workers.stream.cancel import cancel_stream
from hybrid_router.workers.stream.context import StreamContext
from hybrid_router.workers.stream.relay import REDIS_DOWN, RunOutcome, stream_request
from hybrid_router.workers.stream.runtime import StreamRuntime
from hybrid_router.workers.stream.sweep import sweep_streams
from hybrid_router.workers.stream.task_view import FAILED_OUTCOMES, StreamRun, StreamTaskView

log = get_logger(__name__)
T = TypeVar("T")

POP_TIMEOUT_S = 1
POP_BATCH = 32  # messages taken off the queue in one round trip when there is a backlog
HOUSEKEEPING_S = 1.0  # heartbeat, dead engines' taken messages, the sweep
SWEEP_HOLD_AFTER_OUTAGE_S = 3.0
ORPHAN_CONFIRM_S = 2.0  # a stream is taken over once it has had no lease this long
__all__ = ["EventSink", "StreamEngine", "parse_task_message"]


def parse_task_message(raw: bytes) -> tuple[str, str, list[Any]]:
    """(task name, task id, args) of a Celery task message (protocol 2, kombu Redis envelope)."""
    envelope = orjson.loads(raw)
    headers = envelope.get("headers") or {}
    body = envelope["body"]
    if (envelope.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    decoded = orjson.loads(body)
    args = decoded[0] if isinstance(decoded, list) else decoded.get("args", [])
    return str(headers.get("task", "")), str(headers.get("id", "")), list(args)


class StreamEngine:
    """One asyncio loop in its own thread that runs every stream of the process."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.max_streams = ctx.settings.stream_worker_concurrency
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run_loop, name="stream-engine", daemon=True)
        self._ready = threading.Event()
        self._rt: StreamRuntime | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._consuming = False
        self._running: set[asyncio.Task[Any]] = set()  # strong references, waited for at stop
        self._publisher_task: asyncio.Task[None] | None = None
        self._events: TaskEvents | None = None
        self._view: StreamTaskView | None = None
        self._runs: dict[str, list[StreamRun]] = {}  # request id -> its runs taken off the queue
        self._housekeeper: asyncio.Task[None] | None = None
        self._list_key: str | None = None
        self._orphans_seen: dict[str, float] = {}  # the sweep's streams without a lease
        self.engine_id = uuid.uuid4().hex
        keys = self.keys = Keys(ctx.settings.key_prefix)
        self.taken_key = keys.stream_taken(self.engine_id)
        self._alive_key = keys.stream_engine_alive(self.engine_id)

    # --- from any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def submit(self, request_id: str) -> concurrent.futures.Future[RunOutcome]:
        """Run `request_id`'s stream on the loop; the future holds its outcome."""
        return self._call(self._tracked(stream_request(request_id, self._runtime())))

    def run(self, request_id: str) -> RunOutcome:
        """Run `request_id`'s stream and wait for its outcome (for Celery tasks and tests)."""
        return self.submit(request_id).result()

    def consume(self, list_key: str, forward_key: str, sink: EventSink | None = None,
                hostname: str | None = None) -> None:
        """Start taking task messages off `list_key`; a message for another task than the
        stream task is pushed to `forward_key` (a queue that Celery itself consumes). Each
        stream is reported to Celery (`hybrid_router.workers.stream.task_view`), its task events through
        `sink` as worker `hostname`."""
        self._events = TaskEvents(sink, "stream-task-events") if sink is not None else None
        self._view = StreamTaskView(self._events, hostname)
        self._call(self._start_consumer(list_key, forward_key)).result(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop consuming, let running streams end (up to `timeout`), close the loop."""
        if not self._thread.is_alive():
            return
        try:
            self._call(self._drain(timeout)).result(timeout + 5)
        except Exception:
            log.exception("stream engine did not stop cleanly")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if self._events is not None:
            self._events.close()

    # --- the loop ------------------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _setup(self) -> None:
        self._rt = StreamRuntime.build(self.ctx, self.max_streams + 8)
        self._publisher_task = asyncio.create_task(self._rt.publisher.run(), name="stream-publisher")

    def _runtime(self) -> StreamRuntime:
        if self._rt is None:
            raise RuntimeError("the stream engine is not started")
        return self._rt

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the engine's loop and wait for its result (any other thread)."""
        result: T = self._call(coro).result()
        return result

    @property
    def runtime(self) -> StreamRuntime:
        """What the engine's streams share (use it on the engine's loop, e.g. with `call`)."""
        return self._runtime()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._track(task)
        return await coro

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _start_consumer(self, list_key: str, forward_key: str) -> None:
        self._list_key = list_key
        await self._heartbeat()
        self._consuming = True
        self._consumer = asyncio.create_task(self._consume(list_key, forward_key),
                                             name="stream-consumer")
        self._housekeeper = asyncio.create_task(self._housekeeping(list_key),
                                                name="stream-housekeeping")

    async def _consume(self, list_key: str, forward_key: str) -> None:
        rt = self._runtime()
        slots = asyncio.Semaphore(self.max_streams)
        failures = 0
        # A raw connection of its own: a pop through redis-py cost as much CPU as the claim
        # that follows it.
        pipe = RedisPipe(rt.settings.redis_url, timeout_s=POP_TIMEOUT_S + 10)
        try:
            while self._consuming:
                await slots.acquire()
                count = 1  # slots held: as many messages as this pop may take
                while count < POP_BATCH and not slots.locked():
                    await slots.acquire()  # free now: returns at once
                    count += 1
                try:
                    messages = await self._take(pipe, list_key, count)
                    failures = 0
                except (redis.RedisError, OSError) as exc:
                    messages = []
                    failures += 1
                    log.warning("taking stream tasks failed; retrying", error=str(exc))
                    await asyncio.sleep(min(2.0, 0.1 * 2 ** min(failures, 5)))
                for _ in range(count - len(messages)):
                    slots.release()
                for raw in messages:
                    task = asyncio.create_task(self._handle(raw, forward_key))
                    self._track(task)
                    task.add_done_callback(lambda _t: slots.release())
        finally:
            pipe.close()

    async def _take(self, pipe: RedisPipe, list_key: str, count: int) -> list[bytes]:
        """Up to `count` messages in queue order, each moved onto this engine's taken list:
        what is queued now in one command (the `TAKE` script), else one, waiting for it up to
        `POP_TIMEOUT_S` (``BRPOPLPUSH``).

        Why batches: one blocking move per message made a backlog of new streams wait one loop
        turn each, on a loop busy relaying tokens. Why a script: `count` pipelined
        ``RPOPLPUSH`` cost Redis and this loop one command and one reply each, most of them
        nil (about 23 per stream at 50 streams).
        """
        if count > 1:
            (queued,) = raise_errors(await run_scripts(
                pipe, [(TAKE_SCRIPT, [list_key, self.taken_key], [count])]))
            if queued:
                return list(queued)
        moved_one = raise_errors(await pipe.execute([("BRPOPLPUSH", list_key, self.taken_key,
                                                       POP_TIMEOUT_S)]))
        return [] if moved_one[0] is None else [moved_one[0]]

    async def _handle(self, raw: bytes, forward_key: str) -> None:
        rt = self._runtime()
        try:
            name, task_id, args = parse_task_message(raw)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.error("dropped a message that is not a Celery task message", error=str(exc))
            raise_errors(await rt.store.pool.execute([("LREM", self.taken_key, 1, raw)]))
            return
        if name != STREAM_TASK or not args:
            raise_errors(await rt.store.pool.execute([
                ("MULTI",), ("LPUSH", forward_key, raw), ("LREM", self.taken_key, 1, raw),
                ("EXEC",)]))
            return
        request_id = str(args[0])
        stall = rt.settings.fault_stall_after_take_s
        if stall:  # fault injection (tests): a window between taking and claiming
            await asyncio.sleep(stall)
        await self._run_task(task_id, request_id, name, args, raw)

    async def _run_task(self, task_id: str, request_id: str, name: str, args: list[Any],
                        taken: bytes | None) -> None:
        """Run one stream task (`taken`: its message on this engine's taken list; None for a
        stream taken over by the sweep), reported to Celery's worker state and Flower."""
        rt = self._runtime()
        view = self._view
        if view is not None and view.revoked(task_id):
            await asyncio.get_running_loop().run_in_executor(
                None, cancel_stream, self.ctx, request_id, "its Celery task was revoked")
            if taken is not None:
                raise_errors(await rt.store.pool.execute([("LREM", self.taken_key, 1, taken)]))
            view.received_revoked(task_id, name, args)
            return
        run = StreamRun(task_id, request_id, name, args, view.hostname if view else None,
                        self.terminate)
        runs = self._runs.setdefault(request_id, [])
        runs.append(run)
        run.abort.enter()  # this task's upstream reads can be stopped by `terminate`
        if view is not None:
            view.started(run)
        error: dict[str, str] | None = None
        try:
            outcome: str = await stream_request(
                request_id, rt, None if taken is None else (self.taken_key, taken))
        except Exception as exc:
            log.exception("stream task failed", request_id=request_id)
            outcome, error = "failed", {"code": "internal_error", "message": str(exc)}
        finally:
            runs.remove(run)
            if not runs:
                del self._runs[request_id]
        if view is not None:
            if outcome in FAILED_OUTCOMES and error is None:
                error = await self._error_of(request_id)
            view.ended(run, outcome, error, still_running=request_id in self._runs)

    def terminate(self, request_id: str) -> bool:
        """Revoke with terminate (any thread): cancel the request as ``DELETE`` does, and stop
        its streams running here at once (upstream connection closed, ended `cancelled` with
        the tokens paid for recorded). True if this call cancelled the request."""
        cancelled = cancel_stream(self.ctx, request_id, "its Celery task was revoked")
        self.loop.call_soon_threadsafe(self._stop_runs, request_id)
        return cancelled

    def _stop_runs(self, request_id: str) -> None:
        if self._rt is not None:
            self._rt.publisher.stop(request_id)
        for run in self._runs.get(request_id, ()):
            run.abort.fire()

    async def _error_of(self, request_id: str) -> dict[str, str]:
        """The error a failed request was ended with (for its task's ``task-failed``)."""
        try:
            record = await self._runtime().store.get(request_id)
        except Exception as exc:  # Flower is a view: say what is known
            return {"code": "unknown", "message": f"the request's error is unreadable: {exc}"}
        if record is None:
            return {"code": "missing", "message": "the request record is gone"}
        if record.error is None:
            return {"code": record.status, "message": ""}
        return {"code": record.error.code, "message": record.error.message}

    # --- housekeeping ----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        rt = self._runtime()
        alive_ms = max(1000, int(rt.settings.stream_lease_s * 500))
        # The heartbeat's value says what the engine runs, for the operator's live view
        # (hybrid_router.router.core.live_stats): no extra command, the SET is sent every second anyway.
        host = self._view.hostname if self._view is not None and self._view.hostname else (
            socket.gethostname())
        beat = orjson.dumps({"host": host, "pid": os.getpid(), "running": len(self._running),
                             "capacity": self.max_streams})
        async with rt.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._alive_key, beat, px=alive_ms)
            pipe.sadd(self.keys.stream_engines(), self.engine_id)
            await pipe.execute()

    async def _housekeeping(self, list_key: str) -> None:
        """Once a second: the heartbeat, hand back what dead engines took, and (one engine at a
        time) the sweep and the compaction of finished requests (hybrid_router.router.core.replay). Redis being
        out of reach only delays it."""
        sweep_after = 0.0
        while self._consuming:
            try:
                await self._heartbeat()
                await self._restore_dead_engines(list_key)
                if time.monotonic() >= sweep_after:
                    await self._sweep()
            except REDIS_DOWN as exc:
                # Leases may have expired while Redis was away: give every worker's lease
                # keeper time to take its own back before a sweep would take them over.
                sweep_after = time.monotonic() + SWEEP_HOLD_AFTER_OUTAGE_S
                log.warning("stream housekeeping: Redis unreachable", error=str(exc))
            except Exception:
                log.exception("stream housekeeping failed")
            await asyncio.sleep(HOUSEKEEPING_S)

    async def _restore_dead_engines(self, list_key: str) -> None:
        rt = self._runtime()
        engines = [e.decode() if isinstance(e, bytes) else str(e)
                   for e in await rt.redis.smembers(self.keys.stream_engines())]
        for engine_id in engines:
            if engine_id == self.engine_id:
                continue
            moved = await rt.store.scripts.run(RESTORE_TAKEN_SCRIPT, [
                self.keys.stream_taken(engine_id), self.keys.stream_engine_alive(engine_id),
                list_key, self.keys.stream_engines()], [engine_id])
            if int(moved) > 0:
                log.warning("handed back the stream tasks of a dead stream engine",
                            engine=engine_id, messages=int(moved))

    async def _sweep(self) -> None:
        rt = self._runtime()
        lock_ms = int(HOUSEKEEPING_S * 900)
        if not await rt.redis.set(self.keys.stream_sweep_lock(), self.engine_id, nx=True,
                                  px=lock_ms):
            return
        capacity = self.max_streams - len(self._running)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sweep_streams, self.ctx, self._resume,
                                   self.ctx.redispatch, capacity, self._orphans_seen,
                                   ORPHAN_CONFIRM_S)
        # Finished requests past their replay grace period: compact them (hybrid_router.router.core.replay).
        await loop.run_in_executor(None, compact_due, self.ctx.redis, rt.settings)

    def _resume(self, request_id: str) -> None:
        """Take over a stream whose worker is gone (from the sweep's thread), as the same
        Celery task (its id is the request id), so Flower and ``inspect`` follow it here."""
        self._call(self._tracked(self._run_task(request_id, request_id, STREAM_TASK,
                                                [request_id], None)))

    async def _leave(self, list_key: str | None) -> None:
        """Stop the heartbeat and hand back anything still taken (a clean stop)."""
        if list_key is None:
            return
        rt = self._runtime()
        try:
            await rt.redis.delete(self._alive_key)
            await rt.store.scripts.run(RESTORE_TAKEN_SCRIPT, [
                self.taken_key, self._alive_key, list_key, self.keys.stream_engines()],
                [self.engine_id])
        except REDIS_DOWN as exc:
            log.warning("stream engine could not sign off", error=str(exc))

    async def _drain(self, timeout: float) -> None:
        self._consuming = False
        if self._consumer is not None:
            await asyncio.wait([self._consumer], timeout=POP_TIMEOUT_S + 1)
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        await self._leave(self._list_key)
        pending = set(self._running)
        if pending:
            log.info("waiting for running streams to end", streams=len(pending))
            await asyncio.wait(pending, timeout=timeout)
        if self._rt is not None:
            await self._rt.aclose()
        if self._publisher_task is not None:
            self._publisher_task.cancel()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
