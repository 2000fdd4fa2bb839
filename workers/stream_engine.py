"""The stream engine: every stream of a worker process on one asyncio loop, fed straight from
the stream queue.

Why: with a thread per stream, each new stream paid Celery's consumer (one message at a time,
~2-3 ms each: kombu's ack bookkeeping, the task request, the thread hand-off, the tracer) and
then competed for the GIL with every other stream's token relay; a burst of new streams delayed
both their first tokens and the running streams' next ones. Here one loop (uvloop when
installed) owns an async Redis pool, one upstream connection pool and the coalescing publisher,
and a consumer task takes stream task messages off the stream queue's Redis list itself
(``BRPOP``, or what is queued at once with ``RPOP`` and a count), so starting a stream is one
pop, one claim script and one upstream request.

The messages are ordinary Celery task messages (``hr.stream.run``, args ``[request_id]``): the
intake writes them atomically with the record, the sweep sends them with ``send_task``. A plain
Celery worker on the stream queue would run them too (the task body calls `run_stream`, which
runs the same coroutine here), only slower. For Flower, the engine sends the Celery task events
a worker sends (``task-received``, ``task-started``, ``task-succeeded`` / ``task-failed``) from
its own thread, off the hot path.

Delivery: a message is moved, not popped, off the queue: ``RPOPLPUSH`` onto the engine's own
taken list (`Keys.stream_taken`), and the claim script removes it from there. Each engine keeps
a heartbeat (`Keys.stream_engine_alive`, half of ``Settings.stream_lease_s``, renewed every
second); every engine looks once a second for engines whose heartbeat is gone and hands
their taken messages back to the queue (`RESTORE_TAKEN`), so a worker killed between taking a
message and claiming it delays that request by less than the lease. After the claim, the lease
covers it (see `workers.stream_claim`), and the sweep (`workers.stream_sweep`, run here too)
resumes a stream whose worker died. Exactly-once upstream calls come from the claim either way.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import queue
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import hiredis
import orjson
import redis
import redis.asyncio as aioredis

from router.keys import Keys
from router.logs import get_logger
from router.lua import RESTORE_TAKEN_SCRIPT
from router.redis_pipe import RedisPipe, reply_error
from workers.celery_app import STREAM_TASK
from workers.stream_context import StreamContext
from workers.stream_runtime import StreamRuntime
from workers.stream_sweep import sweep_streams
from workers.streaming import REDIS_DOWN, RunOutcome, stream_request

log = get_logger(__name__)
T = TypeVar("T")

POP_TIMEOUT_S = 1
POP_BATCH = 32  # messages taken off the queue in one round trip when there is a backlog
EVENT_BATCH_S = 0.05
HOUSEKEEPING_S = 1.0  # heartbeat, dead engines' taken messages, the sweep
SWEEP_HOLD_AFTER_OUTAGE_S = 3.0
# Sends Celery task events, a batch at a time: [(event type, fields), ...].
EventSink = Callable[[list[tuple[str, dict[str, Any]]]], None]


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


class TaskEvents:
    """Forwards task events to Flower from a thread of its own (a Celery event is a
    synchronous Redis publish; the loop never waits for one), a batch per wake-up."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._queue: queue.SimpleQueue[tuple[str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="stream-task-events", daemon=True)
        self._thread.start()

    def send(self, event_type: str, **fields: Any) -> None:
        self._queue.put((event_type, fields))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            # Gather what arrives within a short window, so this thread wakes (and takes the
            # GIL from the loop) once per burst of stream starts rather than once per event.
            time.sleep(EVENT_BATCH_S)
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get())
            events = [item for item in batch if item is not None]
            if events:
                try:
                    self._sink(events)
                except Exception as exc:  # Flower is a view; streams never wait or fail for it
                    log.warning("sending task events failed", events=len(events), error=str(exc))
            if len(events) < len(batch):
                return


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
        self._housekeeper: asyncio.Task[None] | None = None
        self._list_key: str | None = None
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

    def consume(self, list_key: str, forward_key: str, sink: EventSink | None = None) -> None:
        """Start taking task messages off `list_key`; a message for another task than the
        stream task is pushed to `forward_key` (a queue that Celery itself consumes)."""
        self._events = TaskEvents(sink) if sink is not None else None
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

    async def _tracked(self, coro: Coroutine[Any, Any, RunOutcome]) -> RunOutcome:
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
        # A raw connection of its own where the URL allows: a pop through redis-py cost as
        # much CPU as the claim that follows it.
        url = rt.settings.redis_url
        pipe = RedisPipe(url, timeout_s=POP_TIMEOUT_S + 10) if RedisPipe.supports(url) else None
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
            if pipe is not None:
                pipe.close()

    async def _take(self, pipe: RedisPipe | None, list_key: str, count: int) -> list[bytes]:
        """Up to `count` messages in queue order, each moved onto this engine's taken list:
        what is queued now in one round trip (pipelined ``RPOPLPUSH``), else one, waiting for
        it up to `POP_TIMEOUT_S` (``BRPOPLPUSH``).

        Why batches: one blocking move per message made a backlog of new streams wait one loop
        turn each, on a loop busy relaying tokens.
        """
        client = self._runtime().redis
        if count > 1:
            moved = await _commands(pipe, client, [("RPOPLPUSH", list_key, self.taken_key)] * count)
            queued = [m for m in moved if m is not None]
            if queued:
                return queued
        moved_one = await _commands(pipe, client, [("BRPOPLPUSH", list_key, self.taken_key,
                                                     POP_TIMEOUT_S)])
        return [] if moved_one[0] is None else [moved_one[0]]

    async def _handle(self, raw: bytes, forward_key: str) -> None:
        rt = self._runtime()
        try:
            name, task_id, args = parse_task_message(raw)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.error("dropped a message that is not a Celery task message", error=str(exc))
            await rt.redis.execute_command("LREM", self.taken_key, 1, raw)
            return
        if name != STREAM_TASK or not args:
            async with rt.redis.pipeline(transaction=True) as forward:
                forward.lpush(forward_key, raw)
                forward.execute_command("LREM", self.taken_key, 1, raw)
                await forward.execute()
            return
        request_id = str(args[0])
        started = time.monotonic()
        events = self._events
        if events is not None:
            events.send("task-received", uuid=task_id, name=name, args=repr(args), kwargs="{}",
                        retries=0, eta=None, expires=None, root_id=task_id, parent_id=None)
            events.send("task-started", uuid=task_id)
        stall = rt.settings.fault_stall_after_take_s
        if stall:  # fault injection (tests): a window between taking and claiming
            await asyncio.sleep(stall)
        try:
            outcome = await stream_request(request_id, rt, (self.taken_key, raw))
        except Exception as exc:
            log.exception("stream task failed", request_id=request_id)
            if events is not None:
                events.send("task-failed", uuid=task_id, exception=repr(exc), traceback="")
            return
        if events is not None:
            events.send("task-succeeded", uuid=task_id, result=repr(outcome),
                        runtime=time.monotonic() - started)

    # --- housekeeping ----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        rt = self._runtime()
        alive_ms = max(1000, int(rt.settings.stream_lease_s * 500))
        async with rt.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._alive_key, "1", px=alive_ms)
            pipe.sadd(self.keys.stream_engines(), self.engine_id)
            await pipe.execute()

    async def _housekeeping(self, list_key: str) -> None:
        """Once a second: the heartbeat, hand back what dead engines took, and (one engine at a
        time) the sweep. Redis being out of reach only delays it."""
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
                                   self.ctx.redispatch, capacity)

    def _resume(self, request_id: str) -> None:
        """Take over a stream whose worker is gone (from the sweep's thread)."""
        self.submit(request_id)

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


async def _commands(pipe: RedisPipe | None, client: aioredis.Redis,
                    commands: list[tuple[Any, ...]]) -> list[Any]:
    """Commands in one round trip on the consumer's raw pipe when it has one, else through a
    redis-py pipeline (TLS and unix socket URLs); an error reply raises what redis-py raises."""
    if pipe is None:
        async with client.pipeline(transaction=False) as p:
            for command in commands:
                p.execute_command(*command)
            return list(await p.execute())
    replies = await pipe.execute(commands)
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise reply_error(reply)
    return replies


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed with uvicorn[standard]
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
