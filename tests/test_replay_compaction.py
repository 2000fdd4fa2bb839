"""Issue 22: a finished request's replay log and record are compacted after the grace period
(hybrid_router.router.core.replay), against real Redis: the log and seq counter go, the record shrinks to a few
fields, and every reader still gives exactly what it gave before (the record, and the events
after any seq, Last-Event-ID style). A request that is not terminal is never touched."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.records import PACKED_FIELD, RequestRecord, now
from hybrid_router.router.core.replay import compact_due
from hybrid_router.router.core.store import AsyncRequestStore, RequestStore
from hybrid_router.router.core.subscribe import (
    RedisPySubscription,
    afollow_events,
    follow,
    follow_events,
)
from hybrid_router.settings import Settings

WORDS = [" héllo", " wörld", " ✓", " \"quoted\"", "\n", " 😀", " and", " more", " text"] * 4


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(replay_grace_s=0)


@pytest.fixture
def store(settings: Settings) -> Iterator[RequestStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield RequestStore(client, settings)
    client.close()


def stream_record(tenant: str = "acme") -> RequestRecord:
    return RequestRecord(
        id=uuid.uuid4().hex, tenant=tenant, priority="high", route="stream",
        status="dispatched", model="gpt-4o",
        body={"messages": [{"role": "user", "content": "tell me ✓ " * 50}]}, created_at=now(),
    )


def run_stream(store: RequestStore, end: str = "completed") -> RequestRecord:
    """A stream through the store as the stream lane writes it: accepted, started, token
    events (one or more tokens each), then its end."""
    rec = stream_record()
    assert store.create(rec, [ev.accepted("stream", "high")]).created
    assert store.transition(rec.id, "streaming", event=ev.started()).moved
    chunks = [WORDS[i:i + 1 + i % 3] for i in range(0, len(WORDS), 3)]
    for chunk in chunks:
        assert store.emit(rec.id, [ev.token("".join(chunk))]) > 0
    text = "".join("".join(c) for c in chunks)
    if end == "completed":
        usage = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 41}
        assert store.transition(rec.id, "completed", fields={
            "result": {"content": text, "finish_reason": "stop", "usage": usage,
                       "message": {"role": "assistant", "content": text}},
            "usage": usage, "cost_usd": "0.000123"},
            event=ev.done("stop", usage, None, len(text))).moved
    else:
        assert store.cancel(rec.id, rec.model)[0] == "cancelled"
    got = store.get(rec.id)
    assert got is not None
    return got


def log_view(store: RequestStore, request_id: str, after: int) -> tuple[str, dict[str, Any] | None]:
    """What a subscriber resuming after seq `after` gets: the text, and the final event."""
    events = store.events_after(request_id, after)
    return ("".join(e.get("content", "") for e in events if e["type"] == "token"),
            next((e for e in events if e["type"] in ev.FINAL_EVENT_TYPES), None))


@pytest.mark.parametrize("end", ["completed", "cancelled"])
def test_a_finished_stream_is_compacted_and_every_resume_point_gives_the_same(
        store: RequestStore, settings: Settings, end: str) -> None:
    rec = run_stream(store, end)
    k = store.keys
    final_seq = store.events_after(rec.id)[-1]["seq"]
    before = {n: log_view(store, rec.id, n) for n in range(final_seq + 2)}
    record_bytes = store.redis.memory_usage(k.record(rec.id), samples=0)

    assert compact_due(store.redis, settings) == 1

    assert not store.redis.exists(k.events(rec.id), k.seq(rec.id))
    assert set(store.redis.hkeys(k.record(rec.id))) == {b"status", b"tenant", PACKED_FIELD.encode()}
    assert store.redis.ttl(k.record(rec.id)) > settings.result_ttl_s - 60
    assert int(store.redis.memory_usage(k.record(rec.id), samples=0) or 0) < int(record_bytes or 0)
    assert store.get(rec.id) == rec
    assert {n: log_view(store, rec.id, n) for n in range(final_seq + 2)} == before
    assert store.redis.zcard(k.replay_due()) == 0
    assert compact_due(store.redis, settings) == 0  # nothing left to do


def test_followers_resume_from_a_compacted_log(store: RequestStore, settings: Settings) -> None:
    """The sync and async followers and the redis-py pub/sub follower (what the SSE endpoint and the Python client
    use) give, after compaction, the remaining text and the final event with its seq."""
    rec = run_stream(store)
    events = store.events_after(rec.id)
    tokens = [e for e in events if e["type"] == "token"]
    resume_at = tokens[2]["seq"]
    expected = "".join(e["content"] for e in tokens[3:])
    assert compact_due(store.redis, settings) == 1

    sync = list(follow_events(store.redis, settings, rec.id, resume_at, timeout=5))
    assert "".join(e["content"] for e in sync[:-1]) == expected
    assert sync[-1] == events[-1] and sync[-1]["type"] == "done"
    assert sync[0]["seq"] == tokens[-1]["seq"]
    assert list(follow_events(store.redis, settings, rec.id, events[-1]["seq"], timeout=5)) == []

    async def async_ways() -> tuple[list[dict[str, Any]], list[Any]]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            followed = [e async for e in afollow_events(client, settings, rec.id, resume_at, 5)]
            tailed = [e async for e in follow(RedisPySubscription(client, settings, rec.id),
                                                  resume_at, 15)]
            return followed, tailed
        finally:
            await client.aclose()

    followed, tailed = asyncio.run(async_ways())
    assert followed == sync and tailed == sync


def test_compaction_never_touches_a_request_that_is_not_terminal(
        store: RequestStore, settings: Settings) -> None:
    """Even listed as due (which only a final event does), a running stream keeps its log:
    a takeover reads its token events back from it."""
    rec = stream_record()
    assert store.create(rec, [ev.accepted("stream", "high")]).created
    assert store.transition(rec.id, "streaming", event=ev.started()).moved
    store.emit(rec.id, [ev.token(" one")])
    store.redis.zadd(store.keys.replay_due(), {rec.id: 0})
    log_before = store.redis.xrange(store.keys.events(rec.id))
    fields_before = store.redis.hgetall(store.keys.record(rec.id))

    assert compact_due(store.redis, settings) == 0
    assert store.redis.xrange(store.keys.events(rec.id)) == log_before
    assert store.redis.hgetall(store.keys.record(rec.id)) == fields_before
    assert store.redis.exists(store.keys.seq(rec.id))


def test_nothing_is_compacted_before_the_grace_period(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(replay_grace_s=3600)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = RequestStore(client, settings)
        rec = run_stream(store)
        assert client.zscore(store.keys.replay_due(), rec.id) is not None
        assert 0 < client.ttl(store.keys.replay_due()) <= settings.replay_ttl_s + 3600
        assert compact_due(client, settings) == 0
        assert client.exists(store.keys.events(rec.id))
    finally:
        client.close()


def test_keep_body_false_keeps_only_the_result(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(replay_grace_s=0, keep_body=False)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        store = RequestStore(client, settings)
        rec = run_stream(store)
        assert compact_due(client, settings) == 1
        got = store.get(rec.id)
        assert got is not None and got.body == {}
        assert got == rec.model_copy(update={"body": {}})

        async def owned() -> RequestRecord | None:
            astore = AsyncRequestStore(aioredis.Redis.from_url(settings.redis_url), settings)
            try:
                return await astore.get_owned(rec.id, "acme")
            finally:
                astore.close()
                await astore.redis.aclose()

        assert asyncio.run(owned()) == got
    finally:
        client.close()


def test_a_late_write_after_compaction_reads_over_the_packed_fields(
        store: RequestStore, settings: Settings) -> None:
    """A fact learnt after the compaction (e.g. a batch billed after its request was
    cancelled) is a plain field, read over the packed ones."""
    rec = run_stream(store)
    assert compact_due(store.redis, settings) == 1
    assert store.annotate(rec.id, {"cost_usd": "0.5", "content_tokens_relayed": 7})
    got = store.get(rec.id)
    assert got is not None and str(got.cost_usd) == "0.5" and got.content_tokens_relayed == 7
    assert got.result == rec.result


def test_the_api_event_hub_resumes_from_a_compacted_log(
        store: RequestStore, settings: Settings) -> None:
    """The SSE endpoint's follower (`hybrid_router.router.core.event_hub`): Last-Event-ID after compaction."""
    from hybrid_router.router.core.event_hub import EventHub

    rec = run_stream(store)
    events = store.events_after(rec.id)
    tokens = [e for e in events if e["type"] == "token"]
    assert compact_due(store.redis, settings) == 1

    async def follow(after: int) -> list[dict[str, Any] | None]:
        hub = EventHub(settings)
        try:
            return [e async for e in hub.follow(rec.id, after, idle_s=5)]
        finally:
            await hub.aclose()

    for after in (0, tokens[0]["seq"], tokens[-2]["seq"]):
        got = asyncio.run(follow(after))
        assert got[-1] == events[-1]
        assert "".join(e["content"] for e in got[:-1] if e) == "".join(
            e["content"] for e in tokens if e["seq"] > after)
    assert asyncio.run(follow(events[-1]["seq"])) == []


def test_the_record_fingerprint_does_not_depend_on_field_order() -> None:
    """A hash table's HGETALL order can change between two reads (incremental rehashing), so
    the compaction's check compares fields sorted by name, in Python as in the script."""
    from hybrid_router.router.core.replay import _digest

    raw = {b"status": b"completed", b"tenant": b"acme", b"body": b"{}", b"id": b"x"}
    assert _digest(raw) == _digest(dict(reversed(list(raw.items()))))


def test_a_cancelled_request_inside_a_batch_keeps_its_batch_id_plain() -> None:
    """The batch's write-back bills a request cancelled inside it when its result comes
    (`paid_after_cancel` in hybrid_router.workers.batch.lua reads batch_id and cost_usd as plain fields)."""
    from hybrid_router.router.core.replay import compact_fields

    raw = {"status": "cancelled", "tenant": "acme", "id": "x", "batch_id": "batch_1",
           "body": "{}", "created_at": "1.0"}
    names = compact_fields(raw, [], keep_body=True)[::2]
    assert names == ["batch_id", "status", "tenant", PACKED_FIELD]
    billed = compact_fields({**raw, "cost_usd": "0.1"}, [], keep_body=True)[::2]
    assert billed == ["status", "tenant", PACKED_FIELD]
