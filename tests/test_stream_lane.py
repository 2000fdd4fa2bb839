"""The stream lane end to end: real API and stream worker subprocesses, real Redis, simulator.

One API + one stream worker serve the whole module (started once); each test uses its own
prompt, so simulator counters and fault directives never mix between tests.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_stats
from hybrid_router.workers.celery_app import create_celery
from hybrid_router.workers.stream.context import StreamContext
from tests.support import Stack, delete_prefix, wait_until

MODEL = "gpt-4o-mini"
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
AUTH = {"Authorization": f"Bearer {KEY_A}"}


def lane_settings(redis_base_url: str, sim_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": f"{redis_base_url}/0",
        "key_prefix": f"t{uuid.uuid4().hex[:10]}",
        "upstream_base_url": sim_url,
        "upstream_api_key": "sk-test-simulator",
        "api_keys": {KEY_A: "tenant-a", KEY_B: "tenant-b"},
        "retry_backoff_base_s": 0.02,
        "retry_backoff_max_s": 0.2,
        "sse_keepalive_s": 0.3,
        "stream_worker_concurrency": 8,
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def lane(redis_base_url: str, sim_url: str) -> Iterator[Stack]:
    settings = lane_settings(redis_base_url, sim_url)
    with Stack(settings) as stack:
        stack.start_api(timeout=60)
        stack.start_worker("stream", timeout=60)
        yield stack


@pytest.fixture(scope="module")
def http(lane: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lane.api_url, headers=AUTH, timeout=20) as client:
        yield client


def messages(directive: str = "") -> Any:
    return [{"role": "user", "content": f"Describe lanes {uuid.uuid4().hex} {directive}"}]


def direct_answer(sim_url: str, msgs: Any) -> str:
    """The simulator's answer to the same messages, asked directly with the openai SDK."""
    client = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=msgs)
    return reply.choices[0].message.content or ""


def submit(http: httpx.Client, msgs: list[dict[str, Any]], **fields: Any) -> str:
    r = http.post("/v1/requests", json={"model": MODEL, "messages": msgs, "priority": "high",
                                         **fields})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["id"]
    return request_id


def sse(http: httpx.Client, request_id: str, headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None, stop_after: int | None = None,
        ) -> tuple[list[dict[str, Any]], int]:
    """Read the SSE endpoint: the events (id/event/data checked to agree) and keep-alives seen."""
    events: list[dict[str, Any]] = []
    keepalives = 0
    with http.stream("GET", f"/v1/requests/{request_id}/events", headers=headers,
                     params=params) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(": keep-alive"):
                keepalives += 1
            elif line == "":
                if fields:
                    event = json.loads(fields["data"])
                    assert int(fields["id"]) == event["seq"] and fields["event"] == event["type"]
                    events.append(event)
                    fields = {}
                    if stop_after is not None and len(events) >= stop_after:
                        break
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events, keepalives


def token_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "token")


def assert_complete(events: list[dict[str, Any]], expected: str) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "accepted" and events[-1]["type"] == "done"
    assert token_text(events) == expected
    assert events[-1]["content_length"] == len(expected)


def test_sse_stream_is_complete_and_in_order(http: httpx.Client, sim_url: str) -> None:
    msgs = messages("[[sim:tps=200,tokens=40]]")
    request_id = submit(http, msgs)
    events, _ = sse(http, request_id)  # joins while it streams; closes after `done`
    assert_complete(events, direct_answer(sim_url, msgs))
    record = http.get(f"/v1/requests/{request_id}").json()
    assert record["status"] == "completed"
    assert record["result"]["content"] == token_text(events)
    assert record["usage"]["completion_tokens"] == 40 and float(record["cost_usd"]) > 0
    assert record["started_at"] and record["first_token_at"] and record["finished_at"]


def test_late_subscriber_gets_every_token(http: httpx.Client, sim_url: str) -> None:
    msgs = messages()
    request_id = submit(http, msgs)
    wait_until(lambda: http.get(f"/v1/requests/{request_id}").json()["status"] == "completed",
               15, message="stream completed")
    events, _ = sse(http, request_id)
    assert_complete(events, direct_answer(sim_url, msgs))


def test_reconnect_with_last_event_id_resumes_exactly(http: httpx.Client, sim_url: str) -> None:
    msgs = messages("[[sim:tps=100,tokens=30]]")
    request_id = submit(http, msgs)
    first, _ = sse(http, request_id, stop_after=6)
    rest, _ = sse(http, request_id, headers={"Last-Event-ID": str(first[-1]["seq"])})
    assert rest[0]["seq"] == first[-1]["seq"] + 1
    assert_complete(first + rest, direct_answer(sim_url, msgs))
    by_query, _ = sse(http, request_id, params={"after": 3})
    assert [e["seq"] for e in by_query] == [e["seq"] for e in (first + rest)[3:]]
    after_end, _ = sse(http, request_id, headers={"Last-Event-ID": str(rest[-1]["seq"])})
    assert after_end == []  # nothing after the final event: the response just closes


def test_sse_sends_keepalives_while_waiting(http: httpx.Client) -> None:
    request_id = submit(http, messages("[[sim:ttft=1.0,tokens=3]]"))
    events, keepalives = sse(http, request_id)
    assert keepalives >= 1 and events[-1]["type"] == "done"


def test_sse_of_another_tenant_is_404(http: httpx.Client, lane: Stack) -> None:
    request_id = submit(http, messages())
    r = httpx.get(f"{lane.api_url}/v1/requests/{request_id}/events",
                  headers={"Authorization": f"Bearer {KEY_B}"}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    bad = http.get(f"/v1/requests/{request_id}/events", headers={"Last-Event-ID": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


@pytest.mark.parametrize("directive", [
    "[[sim:fail=429,times=2,retry_after=0.05]]",
    "[[sim:fail=500,times=2]]",
    "[[sim:drop_after=6,tokens=25]]",
])
def test_upstream_faults_end_in_one_unbroken_answer(http: httpx.Client, sim_url: str,
                                                    directive: str) -> None:
    msgs = messages(directive)
    request_id = submit(http, msgs)
    events, _ = sse(http, request_id)
    assert_complete(events, direct_answer(sim_url, msgs))
    stats = sim_stats(sim_url, prompt_hash(msgs))
    assert stats["errors_injected"] + stats["streams_dropped"] >= 1
    assert stats["streams_completed"] == 1  # the direct call above is not a stream


def test_cancel_stops_the_upstream(http: httpx.Client, lane: Stack, sim_url: str) -> None:
    msgs = messages("[[sim:tps=20,tokens=300]]")
    request_id = submit(http, msgs)
    first, _ = sse(http, request_id, stop_after=5)  # accepted, started, three tokens
    assert token_text(first)
    r = http.delete(f"/v1/requests/{request_id}")
    assert r.status_code == 200 and r.json()["previous_status"] == "streaming"
    ph = prompt_hash(msgs)
    wait_until(lambda: sim_stats(sim_url, ph)["streams_aborted"] == 1, 10,
               message="the upstream stream aborted")
    record = wait_until(lambda: (rec := http.get(f"/v1/requests/{request_id}").json())["usage"]
                        and rec, 10, message="paid tokens recorded")
    assert record["status"] == "cancelled"
    events, _ = sse(http, request_id)
    assert events[-1]["type"] == "cancelled"
    relayed = sum(1 for e in events if e["type"] == "token")
    assert relayed <= record["usage"]["completion_tokens"] <= relayed + 2 < 300
    assert float(record["cost_usd"]) > 0
    ledger = Ledger.from_hash(redis.Redis.from_url(lane.settings.redis_url).hgetall(
        Keys(lane.settings.key_prefix).ledger()))
    assert ledger.lines[("stream", "default", MODEL)].completion_tokens >= record["usage"]["completion_tokens"]


def test_a_sigkilled_workers_stream_is_resumed_by_a_new_worker(
        redis_base_url: str, sim_url: str) -> None:
    """The only stream worker is SIGKILLed mid-stream; a worker started afterwards takes the
    stream over from its last token: one gapless sequence equal to the upstream's answer."""
    settings = lane_settings(redis_base_url, sim_url, stream_lease_s=1.5)
    stack = Stack(settings)
    ctx = StreamContext.build(settings)
    try:
        api = stack.start_api(timeout=60)
        worker = stack.start_worker("stream", timeout=60)
        with httpx.Client(base_url=api, headers=AUTH, timeout=10) as client:
            msgs = messages("[[sim:tps=20,tokens=80]]")
            request_id = submit(client, msgs)
            wait_until(lambda: token_text(ctx.store.events_after(request_id)), 10,
                       message="first tokens relayed")
            worker.kill()
            assert client.get(f"/v1/requests/{request_id}").json()["status"] == "streaming"
            stack.start_worker("stream", timeout=60)
            record = wait_until(
                lambda: (rec := client.get(f"/v1/requests/{request_id}").json())["status"]
                == "completed" and rec, 30, message="resumed to completed")
            answer = direct_answer(sim_url, msgs)
            assert record["result"]["content"] == answer
            events, _ = sse(client, request_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert token_text(events) == answer
            assert events[-1]["type"] == "done"
            stats = sim_stats(sim_url, prompt_hash(msgs))
            assert stats["streams_started"] == 2 and stats["continuations"] == 1
    finally:
        ctx.close()
        stack.stop()
        delete_prefix(settings.redis_url, settings.key_prefix)


def test_flower_sees_each_stream_as_a_celery_task(lane: Stack, http: httpx.Client) -> None:
    """What Flower reads: the worker's Celery task events, received over the broker."""
    app = create_celery(lane.settings)
    seen: list[dict[str, Any]] = []
    ready = threading.Event()
    request_ids: list[str] = []

    def listen() -> None:
        with app.connection_for_read() as conn:
            def on_event(event: dict[str, Any]) -> None:
                seen.append(event)
                if any(e["type"] == "task-succeeded" for e in seen) and request_ids:
                    receiver.should_stop = True

            receiver = app.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            with contextlib.suppress(TimeoutError, OSError):
                receiver.capture(limit=None, timeout=15, wakeup=False)

    broker = redis.Redis.from_url(lane.settings.redis_url)

    def subscriptions() -> int:
        return int(broker.pubsub_numpat()) + sum(n for _, n in broker.pubsub_numsub(
            *broker.pubsub_channels()))

    before = subscriptions()
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(5)
    wait_until(lambda: subscriptions() > before, 10, message="event receiver subscribed")
    request_ids.append(submit(http, messages()))
    listener.join(20)
    tasks = [e for e in seen if e["type"].startswith("task-")]
    received = [e for e in tasks if e["type"] == "task-received"]
    assert any(e["name"] == "hr.stream.run" and request_ids[0] in e["args"] for e in received)
    task_id = next(e["uuid"] for e in received if request_ids[0] in e["args"])
    assert task_id == request_ids[0]  # the task id is the request id
    # The worker's events (the API's `task-sent` for the same task may come before or after).
    kinds = [e["type"] for e in tasks if e["uuid"] == task_id and e["type"] != "task-sent"]
    assert kinds == ["task-received", "task-started", "task-succeeded"]
    done = next(e for e in tasks if e["uuid"] == task_id and e["type"] == "task-succeeded")
    assert done["hostname"].startswith("stream") and "completed" in done["result"]


def test_events_answer_alike_on_the_fast_and_the_general_path(http: httpx.Client,
                                                              sim_url: str) -> None:
    """A plain follow takes the route's fast path, one with ``?after=`` FastAPI's general
    handler: the same events, and the same errors for a wrong key or another tenant."""
    msgs = messages("[[sim:tps=200,tokens=12]]")
    request_id = submit(http, msgs)
    fast, _ = sse(http, request_id)
    general, _ = sse(http, request_id, params={"after": 0})
    assert_complete(fast, direct_answer(sim_url, msgs))
    assert general == fast
    for params in (None, {"after": 0}):
        url = f"/v1/requests/{request_id}/events"
        wrong_key = http.get(url, params=params, headers={"Authorization": "Bearer sk-nope"})
        other_tenant = http.get(url, params=params, headers={"Authorization": f"Bearer {KEY_B}"})
        assert wrong_key.status_code == 401 and wrong_key.json()["error"]["code"] == \
            "invalid_api_key"
        assert other_tenant.status_code == 404


def test_a_client_leaving_the_events_stream_leaves_no_subscription(lane: Stack,
                                                                   http: httpx.Client) -> None:
    """The API notices a client going away while no event is due (the upstream's first token
    is seconds away) at once, not at its next write; it stops following and its shared pub/sub
    connection drops the request's channel. The request itself goes on (only the drop-in
    cancels on a disconnect)."""
    request_id = submit(http, messages("[[sim:ttft=6,tps=200,tokens=5]]"))
    events, _ = sse(http, request_id, stop_after=2)  # accepted, started: then leaves
    assert [e["type"] for e in events] == ["accepted", "started"]
    client = redis.Redis.from_url(lane.settings.redis_url)
    channel = Keys(lane.settings.key_prefix).channel(request_id)
    wait_until(lambda: client.pubsub_numsub(channel)[0][1] == 0, 3,
               message="the API to unsubscribe from the request's channel")
    assert http.get(f"/v1/requests/{request_id}").json()["status"] == "streaming"
    wait_until(lambda: http.get(f"/v1/requests/{request_id}").json()["status"] == "completed",
               15, 0.1, message="the request to complete")
