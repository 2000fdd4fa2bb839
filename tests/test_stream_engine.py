"""The stream engine (`hybrid_router.workers.stream.engine`): it takes Celery task messages off the stream
queue itself, runs them on its loop, forwards other tasks to Celery, and reports every stream
to Flower as Celery task events. Real Redis, real simulator, real Celery messages."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from hybrid_router.router.core.celery_app import FLUSH_TASK, STREAM_TASK
from hybrid_router.router.core.celery_message import CeleryMessageBuilder
from hybrid_router.router.core.dispatch import CeleryStreamDispatcher
from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.settings import Settings
from hybrid_router.workers.celery_app import create_celery
from hybrid_router.workers.stream.context import StreamContext
from hybrid_router.workers.stream.engine import parse_task_message
from tests.support import wait_until

MODEL = "gpt-4o-mini"


@pytest.fixture
def ctx(make_settings: Callable[..., Settings], sim_url: str) -> Iterator[StreamContext]:
    context = StreamContext.build(make_settings(upstream_base_url=sim_url,
                                                stream_worker_concurrency=4))
    yield context
    context.close()


def queues(settings: Settings) -> tuple[str, str]:
    keys = Keys(settings.key_prefix)
    return (keys.celery_prefix() + keys.stream_queue(),
            keys.celery_prefix() + keys.stream_control_queue())


def test_parses_the_messages_of_send_task_and_of_the_intake(ctx: StreamContext) -> None:
    app = create_celery(ctx.settings)
    stream_list, _ = queues(ctx.settings)
    queue = Keys(ctx.settings.key_prefix).stream_queue()
    sent = app.send_task(STREAM_TASK, args=["req-1"], queue=queue, routing_key=queue)
    raw = ctx.redis.rpop(stream_list)
    assert isinstance(raw, bytes)
    assert parse_task_message(raw) == (STREAM_TASK, sent.id, ["req-1"])
    _key, built = CeleryMessageBuilder(app, queue).build(STREAM_TASK, ["req-2"])
    name, task_id, args = parse_task_message(built.encode())
    assert (name, args) == (STREAM_TASK, ["req-2"]) and uuid.UUID(task_id)


def test_consumes_the_stream_queue_and_reports_each_stream(ctx: StreamContext) -> None:
    settings = ctx.settings
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def sink(batch: list[tuple[str, dict[str, Any]]]) -> None:
        with lock:
            events.extend(batch)

    stream_list, control_list = queues(settings)
    ctx.engine.consume(stream_list, control_list, sink)
    dispatcher = CeleryStreamDispatcher(create_celery(settings))
    ids = []
    for i in range(6):  # more than the engine's 4 slots: the rest wait in the queue
        req = SubmitRequest.model_validate({
            "model": MODEL, "priority": "high",
            "messages": [{"role": "user", "content": f"engine {i} {uuid.uuid4().hex}"}]})
        ids.append(accept_sync(prepare(req, "default", settings), ctx.store, dispatcher).record.id)

    def all_done() -> bool:
        return all((rec := ctx.store.get(i)) is not None and rec.status == "completed" for i in ids)

    wait_until(all_done, 20, message="every queued stream completed")
    assert ctx.redis.llen(stream_list) == 0

    def reported() -> dict[str, list[str]]:
        with lock:
            by_task: dict[str, list[str]] = {}
            for event_type, fields in events:
                by_task.setdefault(fields["uuid"], []).append(event_type)
            return by_task

    wait_until(lambda: len(reported()) == 6 and all(
        kinds[-1] == "task-succeeded" for kinds in reported().values()), 5,
        message="a task-received ... task-succeeded sequence per stream")
    assert all(kinds == ["task-received", "task-started", "task-succeeded"]
               for kinds in reported().values())
    with lock:
        received = [f for t, f in events if t == "task-received"]
    assert sorted(f["args"] for f in received) == sorted(repr([i]) for i in ids)
    assert {f["name"] for f in received} == {STREAM_TASK}


def test_other_tasks_on_the_stream_queue_go_to_the_control_queue(ctx: StreamContext) -> None:
    settings = ctx.settings
    stream_list, control_list = queues(settings)
    ctx.engine.consume(stream_list, control_list)
    app = create_celery(settings)
    queue = Keys(settings.key_prefix).stream_queue()
    sent = app.send_task(FLUSH_TASK, queue=queue, routing_key=queue)
    forwarded = wait_until(lambda: ctx.redis.lrange(control_list, 0, -1), 5,
                           message="other task forwarded to the control queue")
    assert [parse_task_message(m)[:2] for m in forwarded] == [(FLUSH_TASK, sent.id)]
    ctx.redis.lpush(stream_list, b"not a celery message")
    wait_until(lambda: ctx.redis.llen(stream_list) == 0, 5, message="garbage taken off the queue")
    assert ctx.redis.llen(control_list) == 1
    # Nothing stays on the engine's taken list: forwarded and dropped messages leave it too.
    wait_until(lambda: ctx.redis.llen(ctx.engine.taken_key) == 0, 5, message="taken list empty")


def test_stop_lets_running_streams_end(ctx: StreamContext) -> None:
    settings = ctx.settings
    req = SubmitRequest.model_validate({
        "model": MODEL, "priority": "high",
        "messages": [{"role": "user", "content": f"[[sim:tps=40,tokens=20]] {uuid.uuid4().hex}"}]})
    stream_list, control_list = queues(settings)
    ctx.engine.consume(stream_list, control_list)
    dispatcher = CeleryStreamDispatcher(create_celery(settings))
    request_id = accept_sync(prepare(req, "default", settings), ctx.store, dispatcher).record.id
    wait_until(lambda: (rec := ctx.store.get(request_id)) is not None and rec.status == "streaming",
               5, message="stream started")
    ctx.engine.stop(timeout=10)
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "completed"
    client = redis.Redis.from_url(settings.redis_url)
    assert not client.exists(Keys(settings.key_prefix).lease(request_id))


def test_a_backlog_is_taken_in_queue_order_within_the_slots(ctx: StreamContext) -> None:
    """Messages queued before the engine looks are taken several at a time (the TAKE script's
    RPOPLPUSHes onto its taken list, one command), in queue order, never more than its slots (4) at once, and
    every one runs; none is left on the taken list."""
    settings = ctx.settings
    stream_list, control_list = queues(settings)
    dispatcher = CeleryStreamDispatcher(create_celery(settings))
    ids = []
    for i in range(10):
        req = SubmitRequest.model_validate({
            "model": MODEL, "priority": "high",
            "messages": [{"role": "user", "content": f"backlog {i} {uuid.uuid4().hex}"}]})
        ids.append(accept_sync(prepare(req, "default", settings), ctx.store, dispatcher).record.id)
    assert ctx.redis.llen(stream_list) == 10
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def sink(batch: list[tuple[str, dict[str, Any]]]) -> None:
        with lock:
            events.extend(batch)

    ctx.redis.config_resetstat()  # a private test server: only its counters are reset
    ctx.engine.consume(stream_list, control_list, sink)
    wait_until(lambda: all((rec := ctx.store.get(i)) is not None and rec.status == "completed"
                           for i in ids), 20, message="every queued stream completed")
    assert ctx.redis.llen(stream_list) == 0
    stats = ctx.redis.info("commandstats")
    assert stats["cmdstat_rpoplpush"]["calls"] >= 4  # several per take (inside the script)
    assert ctx.redis.llen(ctx.engine.taken_key) == 0

    def received() -> list[str]:
        with lock:
            return [f["args"] for t, f in events if t == "task-received"]

    wait_until(lambda: len(received()) == 10, 5, message="every stream reported")
    assert received() == [repr([i]) for i in ids]  # started in the order they were queued
    running = peak = 0
    with lock:
        for event_type, _fields in events:
            running += {"task-started": 1, "task-succeeded": -1, "task-failed": -1}.get(
                event_type, 0)
            peak = max(peak, running)
    assert 1 <= peak <= 4


class Recorder:
    """An event sink that keeps every task event the engine sends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        with self.lock:
            self.events.extend(batch)

    def of(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return [(kind, fields) for kind, fields in self.events if fields["uuid"] == task_id]

    def last(self, task_id: str, kind: str) -> dict[str, Any] | None:
        found = [fields for k, fields in self.of(task_id) if k == kind]
        return found[-1] if found else None


def submit_stream(ctx: StreamContext, content: str) -> str:
    dispatcher = CeleryStreamDispatcher(create_celery(ctx.settings))
    req = SubmitRequest.model_validate({"model": MODEL, "priority": "high",
                                        "messages": [{"role": "user", "content": content}]})
    return accept_sync(prepare(req, "default", ctx.settings), ctx.store, dispatcher).record.id


def test_each_stream_reports_its_requests_outcome(ctx: StreamContext) -> None:
    """task-succeeded for completed, task-failed with the error for failed, task-revoked for
    cancelled; the task id is the request id."""
    recorder = Recorder()
    ctx.engine.consume(*queues(ctx.settings), recorder, "stream-test@host")
    completed = submit_stream(ctx, f"ok {uuid.uuid4().hex}")
    failed = submit_stream(ctx, f"[[sim:fail=400]] {uuid.uuid4().hex}")
    cancelled = submit_stream(ctx, f"[[sim:tps=10,tokens=200]] {uuid.uuid4().hex}")
    wait_until(lambda: (rec := ctx.store.get(cancelled)) is not None
               and rec.status == "streaming", 10, message="streaming")
    ctx.store.cancel(cancelled, MODEL)
    assert wait_until(lambda: recorder.last(completed, "task-succeeded"), 10,
                      message="succeeded")["result"] == "'completed'"
    failure = wait_until(lambda: recorder.last(failed, "task-failed"), 10, message="failed")
    assert "upstream_400" in failure["exception"] and "400" in failure["exception"]
    revoked = wait_until(lambda: recorder.last(cancelled, "task-revoked"), 10, message="revoked")
    assert revoked["terminated"] is False
    for task_id in (completed, failed, cancelled):
        kinds = [kind for kind, _ in recorder.of(task_id)]
        assert kinds[:2] == ["task-received", "task-started"] and len(kinds) == 3


def test_terminate_cancels_and_stops_the_upstream_at_once(ctx: StreamContext,
                                                          sim_url: str) -> None:
    from celery.worker import state as worker_state

    from hybrid_router.simulator import prompt_hash
    from hybrid_router.simulator.testing import sim_stats

    recorder = Recorder()
    ctx.engine.consume(*queues(ctx.settings), recorder)
    content = f"[[sim:tps=0.4,tokens=100]] {uuid.uuid4().hex}"  # a token every 2.5 s
    request_id = submit_stream(ctx, content)
    wait_until(lambda: ctx.store.events_after(request_id)[-1]["type"] == "token", 10,
               message="first token")
    running = {run.id: run for run in worker_state.active_requests}
    assert request_id in running and running[request_id].info()["args"] == [request_id]
    running[request_id].terminate(None)
    msgs = [{"role": "user", "content": content}]
    wait_until(lambda: sim_stats(sim_url, prompt_hash(msgs))["streams_aborted"] == 1, 1.0,
               message="the upstream call stopped within 1 s")
    assert wait_until(lambda: recorder.last(request_id, "task-revoked"), 5,
                      message="revoked")["terminated"] is True
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "cancelled"
    assert record.usage is not None and record.usage.completion_tokens >= 1  # paid for
    assert [e["type"] for e in ctx.store.events_after(request_id)].count("cancelled") == 1
    assert request_id not in {run.id for run in worker_state.active_requests}


def test_a_revoked_message_is_cancelled_without_calling_the_upstream(
        ctx: StreamContext, sim_url: str) -> None:
    from celery.worker import state as worker_state

    from hybrid_router.simulator import prompt_hash
    from hybrid_router.simulator.testing import sim_stats

    content = f"revoked {uuid.uuid4().hex}"
    request_id = submit_stream(ctx, content)  # queued: no engine consumes yet
    worker_state.revoked.add(request_id)
    recorder = Recorder()
    ctx.engine.consume(*queues(ctx.settings), recorder)
    wait_until(lambda: recorder.last(request_id, "task-revoked"), 10, message="revoked")
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "cancelled"
    assert [e["type"] for e in ctx.store.events_after(request_id)] == ["accepted", "cancelled"]
    assert sim_stats(sim_url, prompt_hash([{"role": "user", "content": content}]))[
        "requests"] == 0
