"""`hybrid_router.router.core.event_hub.EventHub`, the API's follower of request events, against real Redis
servers and the real EMIT script: replay then live, many followers on one connection, a
follower that falls behind, a gap, a lost connection, and clean unsubscribes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from hybrid_router.router.core import event_hub
from hybrid_router.router.core import events as ev
from hybrid_router.router.core.event_hub import EventHub, OutageTolerantFollower, event_follower
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from tests.support import start_redis_server

Event = dict[str, Any]


def _started(settings: Settings, status: str = "streaming") -> tuple[RequestStore, str]:
    """A store on `settings` and a new request id whose record has `status`."""
    store = RequestStore(redis.Redis.from_url(settings.redis_url), settings)
    request_id = uuid.uuid4().hex
    store.redis.hset(store.keys.record(request_id), "status", status)
    return store, request_id


def _texts(events: list[Event | None]) -> list[str]:
    return [e["content"] if e["type"] == "token" else e["type"] for e in events if e]


async def _next(follower: AsyncIterator[Event | None], timeout: float = 5.0) -> Event | None:
    return await asyncio.wait_for(follower.__anext__(), timeout)


def _subscribers(settings: Settings, request_id: str, store: RequestStore) -> int:
    channel = store.keys.channel(request_id)
    return int(dict(store.redis.pubsub_numsub(channel))[channel.encode()])


def test_replays_the_log_then_follows_live(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    store, request_id = _started(settings)

    async def run() -> tuple[list[Event | None], int]:
        hub = EventHub(settings)
        try:
            store.emit(request_id, [ev.token("a"), ev.token("b")], guard=False)
            follower = hub.follow(request_id, 1, idle_s=0.2)
            got = [await _next(follower)]
            got.append(await _next(follower))  # nothing for idle_s: a keep-alive
            following = _subscribers(settings, request_id, store)
            store.emit(request_id, [ev.token("c"), ev.error("x", "boom")], guard=False)
            got += [event async for event in follower]
            return got, following
        finally:
            await hub.aclose()

    got, following = asyncio.run(run())
    assert got[1] is None
    assert _texts(got) == ["b", "c", "error"]
    assert [e["seq"] for e in got if e] == [2, 3, 4]
    assert following == 1
    assert _subscribers(settings, request_id, store) == 0  # unsubscribed after the final event


def test_many_followers_share_one_connection(tmp_path: Path,
                                            make_settings: Callable[..., Settings]) -> None:
    """Forty requests followed at once, each from its start and one of them twice: every
    follower gets exactly its own events, in order, over a single subscribed connection."""
    proc, url = start_redis_server(tmp_path)
    settings = make_settings(redis_url=f"{url}/0")
    ids = [_started(settings)[1] for _ in range(40)]
    store = RequestStore(redis.Redis.from_url(settings.redis_url), settings)

    async def produce() -> None:
        for n in range(5):
            for request_id in ids:
                store.emit(request_id, [ev.token(f"{request_id[:4]}-{n}")], guard=False)
            await asyncio.sleep(0.01)
        for request_id in ids:
            store.emit(request_id, [ev.done("stop", None, None, 5)], guard=False)

    async def run() -> tuple[list[list[Event | None]], int]:
        hub = EventHub(settings)

        async def follow(request_id: str) -> list[Event | None]:
            return [event async for event in hub.follow(request_id, 0, idle_s=5)]

        try:
            tasks = [asyncio.create_task(follow(i)) for i in [*ids, ids[0]]]
            await asyncio.sleep(0.2)  # all subscribed (they wait for their first event)
            connections = [c for c in store.redis.client_list() if int(c["sub"]) > 0]
            await produce()
            return await asyncio.wait_for(asyncio.gather(*tasks), 10), len(connections)
        finally:
            await hub.aclose()

    try:
        results, subscribed_connections = asyncio.run(run())
    finally:
        proc.stop()
    assert subscribed_connections == 1
    for request_id, got in zip([*ids, ids[0]], results, strict=True):
        assert _texts(got) == [f"{request_id[:4]}-{n}" for n in range(5)] + ["done"]
        assert [e["seq"] for e in got if e] == list(range(1, 7))


def test_a_follower_that_falls_behind_catches_up_from_the_log(
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    """More events than a follower may buffer arrive while it is not reading: it drops them
    and reads the log from its last seq instead, so it still gets each event once."""
    monkeypatch.setattr(event_hub, "MAX_BUFFERED", 3)
    settings = make_settings()
    store, request_id = _started(settings)

    async def run() -> list[Event | None]:
        hub = EventHub(settings)
        try:
            follower = hub.follow(request_id, 0, idle_s=5)
            store.emit(request_id, [ev.token("t0")], guard=False)
            got = [await _next(follower)]
            for n in range(1, 20):  # published one at a time while the follower does not read
                store.emit(request_id, [ev.token(f"t{n}")], guard=False)
            store.emit(request_id, [ev.done("stop", None, None, 20)], guard=False)
            await asyncio.sleep(0.1)
            return got + [event async for event in follower]
        finally:
            await hub.aclose()

    got = asyncio.run(run())
    assert _texts(got) == [f"t{n}" for n in range(20)] + ["done"]
    assert [e["seq"] for e in got if e] == list(range(1, 22))


def test_a_gap_in_live_events_is_filled_from_the_log(
        make_settings: Callable[..., Settings]) -> None:
    """An event that reached the log but not the channel (as after a reconnect) is read from
    the log when the next live event shows the gap."""
    settings = make_settings()
    store, request_id = _started(settings)
    keys = store.keys

    async def run() -> list[Event | None]:
        hub = EventHub(settings)
        try:
            follower = hub.follow(request_id, 0, idle_s=5)
            store.emit(request_id, [ev.token("a")], guard=False)
            got = [await _next(follower)]
            # seq 2 goes to the log only, as the EMIT script would write it, minus the publish
            store.redis.incr(keys.seq(request_id))
            store.redis.xadd(keys.events(request_id), {"d": '{"seq":2,"type":"token",'
                                                        '"content":"b"}'}, id="0-2")
            store.emit(request_id, [ev.token("c"), ev.done("stop", None, None, 3)], guard=False)
            return got + [event async for event in follower]
        finally:
            await hub.aclose()

    got = asyncio.run(run())
    assert _texts(got) == ["a", "b", "c", "done"]


def test_a_lost_connection_is_recovered_from_the_log(tmp_path: Path,
                                                     make_settings: Callable[..., Settings]
                                                     ) -> None:
    """Redis drops the hub's connection mid-stream: events published meanwhile come from the
    log, later ones live again; with Redis gone, following fails as a connection error."""
    proc, url = start_redis_server(tmp_path)
    settings = make_settings(redis_url=f"{url}/0")
    store, request_id = _started(settings)

    async def run() -> list[Event | None]:
        hub = EventHub(settings)
        try:
            follower = hub.follow(request_id, 0, idle_s=5)
            store.emit(request_id, [ev.token("a")], guard=False)
            got = [await _next(follower)]
            assert store.redis.client_kill_filter(_type="pubsub") == 1
            store.emit(request_id, [ev.token("b")], guard=False)  # while nobody is subscribed
            got.append(await _next(follower))
            await asyncio.sleep(0.05)
            store.emit(request_id, [ev.token("c"), ev.done("stop", None, None, 3)], guard=False)
            got += [event async for event in follower]

            _store2, second = _started(settings)
            other = hub.follow(second, 0, idle_s=5)
            _store2.emit(second, [ev.token("x")], guard=False)
            assert _texts([await _next(other)]) == ["x"]
            proc.stop()
            with pytest.raises(redis.ConnectionError):
                await _next(other)
            return got
        finally:
            await hub.aclose()

    try:
        got = asyncio.run(run())
    finally:
        proc.stop()
    assert _texts(got) == ["a", "b", "c", "done"]


def test_over_or_unknown_requests_end_at_once(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    store, finished = _started(settings, "completed")

    async def run() -> tuple[list[Event | None], list[Event | None], list[Event | None]]:
        hub = EventHub(settings)
        try:
            unknown = [e async for e in hub.follow(uuid.uuid4().hex, 0, idle_s=5)]
            over = [e async for e in hub.follow(finished, 0, idle_s=5)]
            store.emit(finished, [ev.token("late"), ev.done("stop", None, None, 1)], guard=False)
            replay = await asyncio.wait_for(_collect(hub.follow(finished, 0, idle_s=5)), 5)
            return unknown, over, replay
        finally:
            await hub.aclose()

    unknown, over, replay = asyncio.run(run())
    assert unknown == [] and over == []
    assert _texts(replay) == ["late", "done"]


async def _collect(follower: AsyncIterator[Event | None]) -> list[Event | None]:
    return [event async for event in follower]


def test_a_cancelled_follower_unsubscribes(make_settings: Callable[..., Settings]) -> None:
    """A client that leaves mid-stream (its follower task is cancelled) leaves no
    subscription behind, and the others following the same request carry on."""
    settings = make_settings()
    store, request_id = _started(settings)

    async def run() -> tuple[int, int, list[Event | None]]:
        hub = EventHub(settings)
        try:
            leaving = asyncio.create_task(_collect(hub.follow(request_id, 0, idle_s=5)))
            staying = asyncio.create_task(_collect(hub.follow(request_id, 0, idle_s=5)))
            await asyncio.sleep(0.1)
            both = _subscribers(settings, request_id, store)
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            store.emit(request_id, [ev.token("a"), ev.done("stop", None, None, 1)], guard=False)
            got = await asyncio.wait_for(staying, 5)
            await asyncio.sleep(0.05)
            return both, _subscribers(settings, request_id, store), got
        finally:
            await hub.aclose()

    both, after, got = asyncio.run(run())
    assert both == 1  # one subscription on the shared connection for both followers
    assert after == 0
    assert _texts(got) == ["a", "done"]


def test_every_redis_url_is_followed_by_the_hub(make_settings: Callable[..., Settings]) -> None:
    """TLS and unix-socket URLs take the same shared connection as plain TCP (the lanes over
    them run end to end in tests/test_redis_transports.py)."""
    for url in ("redis://127.0.0.1:6379/0", "unix:///tmp/redis.sock?db=0",
                "rediss://example.com:6380/0"):
        follower = event_follower(make_settings(redis_url=url))
        assert isinstance(follower, OutageTolerantFollower)
        assert isinstance(follower.inner, EventHub)
