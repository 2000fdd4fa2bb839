"""POST/GET/DELETE /v1/requests through real HTTP against the API subprocess and real Redis:
route decisions, hand-over before the 202, tenant isolation, idempotency, budgets, Unicode."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from tests.support import Stack

KEY_A, KEY_B = "key-tenant-a-0123456789", "key-tenant-b-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
MSG = [{"role": "user", "content": "hello"}]


def stack_settings(redis_base_url: str, **overrides: Any) -> Settings:
    return Settings(
        redis_url=f"{redis_base_url}/0",
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        api_keys={KEY_A: "tenant-a", KEY_B: "tenant-b"},
        log_format="json",
        _env_file=None,
        **overrides,
    )


@pytest.fixture(scope="module")
def api(redis_base_url: str) -> Iterator[tuple[str, Settings]]:
    settings = stack_settings(redis_base_url, flush_interval_s=60,
                              expected_batch_turnaround_s=3600)
    with Stack(settings) as stack:
        yield stack.start_api(), settings


@pytest.fixture
def r(redis_base_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"{redis_base_url}/0")
    yield client
    client.close()


def celery_stream_messages(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The kombu messages waiting in the stream queue's Redis list, decoded."""
    out = []
    for raw in r.lrange(f"{keys.celery_prefix()}{keys.stream_queue()}", 0, -1):
        message = orjson.loads(raw)
        args = orjson.loads(base64.b64decode(message["body"]))[0]
        out.append({"task": message["headers"]["task"], "args": args})
    return out


def submit(url: str, body: dict[str, Any], headers: dict[str, str] = A) -> httpx.Response:
    return httpx.post(f"{url}/v1/requests", json=body, headers=headers, timeout=10)


def test_health_and_ready(api: tuple[str, Settings]) -> None:
    url, _ = api
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] == "ok"


def test_low_is_in_the_pending_queue_when_the_202_arrives(
    api: tuple[str, Settings], r: redis.Redis
) -> None:
    url, settings = api
    keys = Keys(settings.key_prefix)
    resp = submit(url, {"messages": MSG, "priority": "low", "model": "gpt-4o"})
    assert resp.status_code == 202, resp.text
    data = resp.json()
    # Checked right after the 202, with no waiting: the hand-over happened before the answer.
    assert data["id"].encode() in r.lrange(keys.pending("gpt-4o"), 0, -1)
    stored = r.hgetall(keys.record(data["id"]))
    assert stored[b"status"] == b"queued" and stored[b"route"] == b"batch"
    assert stored[b"tenant"] == b"tenant-a"
    assert b"batch" in stored[b"route_reason"]
    assert data["route"] == "batch" and data["status"] == "queued"
    assert data["channel"] == keys.channel(data["id"])
    assert data["events_url"].endswith(f"/v1/requests/{data['id']}/events")
    assert data["id"] not in {m["args"][0] for m in celery_stream_messages(r, keys)}


@pytest.mark.parametrize(
    ("body", "reason_word"),
    [
        ({"priority": "high"}, "high"),
        ({"priority": "normal"}, "normal"),
        ({}, "normal"),  # normal is the default priority
        ({"priority": "low", "deadline_s": 30}, "deadline"),
    ],
    ids=["high", "normal", "default-priority", "low-with-short-deadline"],
)
def test_stream_routes_send_a_celery_message_before_the_202(
    api: tuple[str, Settings], r: redis.Redis, body: dict[str, Any], reason_word: str
) -> None:
    url, settings = api
    keys = Keys(settings.key_prefix)
    resp = submit(url, {"messages": MSG, **body})
    assert resp.status_code == 202, resp.text
    data = resp.json()
    messages = celery_stream_messages(r, keys)
    assert {"task": "hr.stream.run", "args": [data["id"]]} in messages
    stored = r.hgetall(keys.record(data["id"]))
    assert stored[b"route"] == b"stream" and stored[b"status"] == b"dispatched"
    assert reason_word.encode() in stored[b"route_reason"]
    assert r.zscore(keys.dispatched(), data["id"]) is not None
    for model in ("gpt-4o-mini", "gpt-4o"):
        assert data["id"].encode() not in r.lrange(keys.pending(model), 0, -1)


def test_low_with_long_deadline_stays_on_batch(api: tuple[str, Settings]) -> None:
    url, _ = api
    data = submit(url, {"messages": MSG, "priority": "low", "deadline_s": 86_400}).json()
    assert data["route"] == "batch"


def test_normal_routes_as_configured(redis_base_url: str, r: redis.Redis) -> None:
    settings = stack_settings(redis_base_url, normal_route="batch")
    with Stack(settings) as stack:
        data = submit(stack.start_api(), {"messages": MSG, "priority": "normal"}).json()
        assert data["route"] == "batch"
        assert "ROUTER_NORMAL_ROUTE" in data["route_reason"]
        keys = Keys(settings.key_prefix)
        assert data["id"].encode() in r.lrange(keys.pending(settings.default_model), 0, -1)


def test_get_returns_the_record(api: tuple[str, Settings]) -> None:
    url, _ = api
    body = {"messages": MSG, "priority": "low", "metadata": {"user": 7}, "temperature": 0.2}
    rid = submit(url, body).json()["id"]
    view = httpx.get(f"{url}/v1/requests/{rid}", headers=A).json()
    assert view["id"] == rid and view["status"] == "queued" and view["priority"] == "low"
    assert view["metadata"] == {"user": 7}
    assert view["body"]["temperature"] == 0.2 and "priority" not in view["body"]
    assert view["body"]["model"] == "gpt-4o-mini"
    assert "tenant" not in view and view["result"] is None


def test_tenant_isolation_get_and_delete_answer_404(
    api: tuple[str, Settings], r: redis.Redis
) -> None:
    url, settings = api
    rid = submit(url, {"messages": MSG, "priority": "low"}).json()["id"]
    got = httpx.get(f"{url}/v1/requests/{rid}", headers=B)
    assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"
    deleted = httpx.delete(f"{url}/v1/requests/{rid}", headers=B)
    assert deleted.status_code == 404
    # The other tenant's attempt changed nothing; an unknown id looks exactly the same.
    assert r.hget(Keys(settings.key_prefix).record(rid), "status") == b"queued"
    unknown = httpx.get(f"{url}/v1/requests/{uuid.uuid4().hex}", headers=B)
    assert unknown.status_code == 404
    assert httpx.get(f"{url}/v1/requests/{rid}", headers=A).status_code == 200


def test_delete_cancels_and_leaves_the_queue(api: tuple[str, Settings], r: redis.Redis) -> None:
    url, settings = api
    keys = Keys(settings.key_prefix)
    rid = submit(url, {"messages": MSG, "priority": "low"}).json()["id"]
    resp = httpx.delete(f"{url}/v1/requests/{rid}", headers=A)
    assert resp.status_code == 200
    assert resp.json() == {"id": rid, "status": "cancelled", "previous_status": "queued"}
    assert rid.encode() not in r.lrange(keys.pending(settings.default_model), 0, -1)
    assert httpx.get(f"{url}/v1/requests/{rid}", headers=A).json()["status"] == "cancelled"
    again = httpx.delete(f"{url}/v1/requests/{rid}", headers=A)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_terminal"


def test_idempotency_same_body_same_id(api: tuple[str, Settings], r: redis.Redis) -> None:
    url, settings = api
    keys = Keys(settings.key_prefix)
    body = {"messages": MSG, "priority": "low", "idempotency_key": "order-42"}
    first = submit(url, body)
    second = submit(url, body)
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["idempotent_replay"] is True and first.json()["idempotent_replay"] is False
    queue = r.lrange(keys.pending(settings.default_model), 0, -1)
    assert queue.count(first.json()["id"].encode()) == 1
    # Idempotency keys are per tenant: the same key from tenant B is a new request.
    other = submit(url, body, headers=B)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_budget_becomes_a_max_tokens_cap_from_the_lane_price(api: tuple[str, Settings]) -> None:
    url, _ = api
    budget = {"messages": MSG, "model": "gpt-4o", "max_cost_usd": "0.01"}
    stream = submit(url, {**budget, "priority": "high"}).json()["id"]
    batch = submit(url, {**budget, "priority": "low"}).json()["id"]
    s_cap = httpx.get(f"{url}/v1/requests/{stream}", headers=A).json()["body"]["max_tokens"]
    b_cap = httpx.get(f"{url}/v1/requests/{batch}", headers=A).json()["body"]["max_tokens"]
    # gpt-4o output is $10/Mtok: $0.01 buys ~1000 tokens on the stream lane, ~2000 at half price.
    assert 990 <= s_cap <= 1000
    assert 1990 <= b_cap <= 2000
    capped = submit(url, {**budget, "priority": "high", "max_tokens": 50}).json()["id"]
    assert httpx.get(f"{url}/v1/requests/{capped}", headers=A).json()["body"]["max_tokens"] == 50


def test_fast_and_general_paths_answer_alike(api: tuple[str, Settings]) -> None:
    """``application/json`` takes the submit fast path; with a charset parameter the request
    goes through FastAPI's general handler (hybrid_router.router.api.fast_path). Both answer the same."""
    url, _ = api
    answers = []
    for content_type in ("application/json", "application/json; charset=utf-8"):
        for priority in ("low", "high"):
            resp = httpx.post(f"{url}/v1/requests", headers={**A, "Content-Type": content_type},
                              content=orjson.dumps({"messages": MSG, "priority": priority}))
            assert resp.status_code == 202, resp.text
            assert resp.headers["content-type"] == "application/json"
            data = resp.json()
            rid = data.pop("id")
            assert data.pop("channel").endswith(rid)
            # Relative without ROUTER_PUBLIC_BASE_URL (never built from the Host header).
            assert data.pop("events_url") == f"/v1/requests/{rid}/events"
            assert data.pop("result_url") == f"/v1/requests/{rid}"
            answers.append(data)
    assert answers[:2] == answers[2:]
    assert list(answers[0]) == ["status", "route", "route_reason", "service_tier",
                                "expected_latency_s", "priority", "model", "idempotent_replay",
                                "stream_url"]


UNICODE = (
    "emoji 👩‍👩‍👧‍👦🏳️‍🌈 cjk 漢字かなカナ한국어 rtl עברית العربية combining e\u0301 a\u0308\u0323 "
    "controls \u0001\u0007\u001b[0m\t\r\n zero-width \u200b\u200d bom \ufeff nbsp\u00a0 max \U0010fffd"
)


def test_unicode_round_trips_byte_exact(api: tuple[str, Settings]) -> None:
    url, _ = api
    messages = [{"role": "system", "content": UNICODE}, {"role": "user", "content": UNICODE[::-1]}]
    rid = submit(url, {"messages": messages, "priority": "low", "metadata": {"k": UNICODE}}).json()["id"]
    view = httpx.get(f"{url}/v1/requests/{rid}", headers=A).json()
    assert view["body"]["messages"][0]["content"].encode() == UNICODE.encode()
    assert view["body"]["messages"][1]["content"].encode() == UNICODE[::-1].encode()
    assert view["metadata"]["k"] == UNICODE


def test_very_long_allowed_content_round_trips(api: tuple[str, Settings]) -> None:
    url, settings = api
    content = ("long ✓ 長い " * 40_000)[: settings.max_body_bytes // 4]
    rid = submit(url, {"messages": [{"role": "user", "content": content}], "priority": "low"})
    assert rid.status_code == 202, rid.text
    view = httpx.get(f"{url}/v1/requests/{rid.json()['id']}", headers=A).json()
    assert view["body"]["messages"][0]["content"] == content


def test_runtime_flush_interval_counts_for_deadlines(
    api: tuple[str, Settings], r: redis.Redis
) -> None:
    url, settings = api
    body = {"messages": MSG, "priority": "low", "deadline_s": 4000}
    assert submit(url, body).json()["route"] == "batch"  # 60 + 3600 < 4000
    from hybrid_router.router.core.runtime_config import set_flush_interval

    set_flush_interval(r, settings, 600)  # now 600 + 3600 > 4000: it must stream
    try:
        data = submit(url, body).json()
        assert data["route"] == "stream" and "4200" in data["route_reason"]
    finally:
        set_flush_interval(r, settings, 60)
