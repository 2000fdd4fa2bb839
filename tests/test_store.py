"""The request store against real Redis: create, read, queue entries, transitions that refuse to
leave a terminal state, events numbered in order, idempotency per tenant, cancel."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.records import RequestRecord, now
from hybrid_router.router.core.store import AsyncRequestStore, RequestStore
from hybrid_router.settings import Settings


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def store(settings: Settings) -> Iterator[RequestStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield RequestStore(client, settings)
    client.close()


def record(route: str = "batch", tenant: str = "acme", idem: str | None = None) -> RequestRecord:
    return RequestRecord(
        id=uuid.uuid4().hex, tenant=tenant, priority="low" if route == "batch" else "high",
        route=route, status="queued" if route == "batch" else "dispatched", model="gpt-4o",
        body={"messages": [{"role": "user", "content": "hi ✓"}]}, created_at=now(),
        idempotency_key=idem,
    )


def test_create_then_get_round_trips(store: RequestStore) -> None:
    rec = record()
    assert store.create(rec, [ev.accepted("batch", "low"), ev.queued()]).created
    got = store.get(rec.id)
    assert got == rec
    assert store.redis.lrange(store.keys.pending("gpt-4o"), 0, -1) == [rec.id.encode()]
    assert b"gpt-4o" in store.redis.smembers(store.keys.pending_models())
    assert [e["type"] for e in store.events_after(rec.id)] == ["accepted", "queued"]
    assert [e["seq"] for e in store.events_after(rec.id)] == [1, 2]
    assert store.get(uuid.uuid4().hex) is None


def test_create_keeps_every_character_of_the_fields(store: RequestStore) -> None:
    """The fields reach the script as one JSON array (decoded by Lua's cjson): quotes,
    backslashes, control characters, NUL, non-ASCII and astral text come back unchanged."""
    rec = record().model_copy(update={
        "body": {"messages": [{"role": "user", "content": 'q"\\ \n\t\u0000\u001f é ✓ 😀 \u2028 '
                                                          '\\u0041 {"x": [1]}'}]},
        "metadata": {"k\u00e9y": ["\\", None, 1.5, 2**62]},
        "route_reason": "ü" * 3000,
    })
    assert store.create(rec, [ev.accepted("batch", "low")]).created
    assert store.get(rec.id) == rec


def test_stream_record_goes_to_the_dispatched_set(store: RequestStore) -> None:
    rec = record("stream")
    store.create(rec, [ev.accepted("stream", "high")])
    assert store.redis.zscore(store.keys.dispatched(), rec.id) is not None
    assert store.redis.llen(store.keys.pending("gpt-4o")) == 0


def test_creating_the_same_id_twice_is_refused(store: RequestStore) -> None:
    rec = record()
    store.create(rec, [])
    assert not store.create(rec, []).created
    assert store.redis.llen(store.keys.pending("gpt-4o")) == 1


def test_transitions_never_leave_a_terminal_state(store: RequestStore) -> None:
    rec = record("stream")
    store.create(rec, [ev.accepted("stream", "high")])
    assert not store.transition(rec.id, "submitted", allowed_from=["queued"]).moved
    assert store.transition(rec.id, "streaming", allowed_from=["dispatched"]).moved
    done = store.transition(rec.id, "completed", fields={"result": {"content": "ok"}},
                            event=ev.done("stop", None, None, 2))
    assert done.moved and done.previous == "streaming"
    for target in ("failed", "cancelled", "streaming", "queued"):
        outcome = store.transition(rec.id, target, fields={"error": {"code": "x", "message": "y"}})
        assert not outcome.moved and outcome.previous == "completed"
    final = store.get(rec.id)
    assert final is not None and final.status == "completed" and final.error is None
    assert final.result is not None and final.result.content == "ok"
    assert final.finished_at is not None
    assert store.redis.ttl(store.keys.record(rec.id)) > 0  # terminal records expire
    assert store.emit(rec.id, [ev.token("late")]) == -1  # no events after the end
    assert store.transition(uuid.uuid4().hex, "failed").previous is None


def test_idempotency_keys_are_per_tenant(store: RequestStore) -> None:
    first = record(idem="same")
    assert store.create(first, [], "fp1").created
    replay = store.create(record(idem="same"), [], "fp1")
    assert not replay.created and replay.request_id == first.id
    assert replay.body_fingerprint == "fp1"
    other_tenant = record(tenant="globex", idem="same")
    assert store.create(other_tenant, [], "fp1").created


def test_cancel_removes_a_queued_request(store: RequestStore) -> None:
    rec = record()
    store.create(rec, [])
    assert store.cancel(rec.id, rec.model) == ("cancelled", "queued")
    assert store.redis.llen(store.keys.pending("gpt-4o")) == 0
    assert store.cancel(rec.id, rec.model) == ("terminal", "cancelled")
    assert store.cancel(uuid.uuid4().hex, rec.model)[0] == "missing"
    assert store.events_after(rec.id)[-1]["type"] == "cancelled"


def test_async_store_shares_the_same_operations(settings: Settings) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        store = AsyncRequestStore(client, settings)
        rec = record("stream")
        assert (await store.create(rec, [ev.accepted("stream", "high")])).created
        assert (await store.get(rec.id)) == rec
        assert (await store.transition(rec.id, "failed")).moved
        assert not (await store.transition(rec.id, "completed")).moved
        assert [e["seq"] for e in await store.events_after(rec.id, 0)] == [1]
        await client.aclose()

    asyncio.run(scenario())
