"""`hybrid_router.router.core.redis_io.RedisPipe` and `PipePool` (the raw connections of the publisher, the
API's event hub and the scripts) against real Redis servers: replies in order, errors as values,
AUTH and SELECT, a lost server; URL parsing (`redis_target`); and the redis-py follower."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.redis_io import TLS, PipePool, RedisPipe, RedisTarget, redis_target
from hybrid_router.router.core.store import RequestStore
from hybrid_router.router.core.subscribe import RedisPySubscription, follow
from hybrid_router.settings import Settings
from tests.support import start_redis_server


def test_replies_in_order_with_errors_as_values(redis_base_url: str) -> None:
    key = f"pipe-test-{uuid.uuid4().hex}"

    async def run() -> list[object]:
        pipe = RedisPipe(f"{redis_base_url}/3")
        try:
            return await pipe.execute([("RPUSH", key, "a", "b"), ("LLEN", key),
                                       ("EVALSHA", "0" * 40, 0), ("LRANGE", key, 0, -1),
                                       ("DEL", key)])
        finally:
            pipe.close()

    replies = asyncio.run(run())
    assert replies[:2] == [2, 2]
    assert isinstance(replies[2], hiredis.ReplyError) and str(replies[2]).startswith("NOSCRIPT")
    assert replies[3:] == [[b"a", b"b"], 1]
    assert redis.Redis.from_url(f"{redis_base_url}/0").exists(key) == 0  # db 3, not db 0


def test_password_and_a_lost_server(tmp_path: Path) -> None:
    proc, url = start_redis_server(tmp_path)
    redis.Redis.from_url(url).config_set("requirepass", "s3cret")
    authed = url.replace("redis://", "redis://:s3cret@") + "/0"

    async def run() -> None:
        pipe = RedisPipe(authed, timeout_s=2)
        assert await pipe.execute([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
        with pytest.raises(redis.AuthenticationError):
            await RedisPipe(url.replace("redis://", "redis://:wrong@") + "/0").execute([("PING",)])
        proc.stop()
        with pytest.raises(redis.ConnectionError):
            await pipe.execute([("GET", "k")])
        with pytest.raises(redis.ConnectionError):  # a new connection is tried, and refused
            await pipe.execute([("GET", "k")])

    try:
        asyncio.run(run())
    finally:
        proc.stop()


def test_every_url_kind_maps_to_one_target() -> None:
    """`redis_target`: the one reading of a Redis URL that every connection is opened from."""
    assert redis_target("redis://u:p%40ss@h:7/3") == RedisTarget("h", 7, db=3, username="u",
                                                                   password="p@ss")
    assert redis_target("unix:///run/redis.sock?db=2") == RedisTarget(path="/run/redis.sock", db=2)
    tls = redis_target("rediss://h/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=optional").tls
    assert tls == TLS(ca_certs="/ca.pem", cert_reqs="optional")
    assert redis_target("rediss://h/0").broker() == (
        "rediss://h:6379/0", {}, {"ssl_ca_certs": None, "ssl_certfile": None, "ssl_keyfile": None,
                              "ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True})
    assert redis_target("unix://:pw@/s.sock?db=1").broker() == (
        "redis+socket://:pw@/s.sock?virtual_host=1", {}, None)
    assert redis_target("redis://u:p%40ss@h:7/3").broker() == ("redis://u:p%40ss@h:7/3", {}, None)
    for bad in ("redis://h/0?socket_timeout=1", "http://h/0", "rediss://h/0?ssl_cert_reqs=maybe"):
        with pytest.raises(ValueError):
            redis_target(bad)


def test_the_redis_py_follower_reads_every_event_after_a_seq(
        make_settings: Callable[..., Settings]) -> None:
    """The redis-py pub/sub follower (the Python client's, over the same `follow` core as the
    event hub) replays after a seq, keeps alive when idle, and ends at the final event."""
    settings = make_settings()
    sync = redis.Redis.from_url(settings.redis_url)
    store = RequestStore(sync, settings)
    request_id = uuid.uuid4().hex
    sync.hset(store.keys.record(request_id), "status", "streaming")
    client = aioredis.Redis.from_url(settings.redis_url)

    async def run() -> list[dict[str, Any] | None]:
        store.emit(request_id, [ev.token("a"), ev.token("b")], guard=False)
        follower = follow(RedisPySubscription(client, settings, request_id), 1, idle_s=0.2)
        got = [await follower.__anext__()]
        got.append(await asyncio.wait_for(follower.__anext__(), 5))  # idle: a keep-alive
        store.emit(request_id, [ev.token("c"), ev.error("x", "boom")], guard=False)
        got += [event async for event in follower]
        return got

    got = asyncio.run(run())
    assert got[1] is None
    assert [e["content"] if e["type"] == "token" else e["type"] for e in got if e] == \
        ["b", "c", "error"]
    assert [e["seq"] for e in got if e] == [2, 3, 4]


def test_a_server_that_never_answers_is_a_timeout() -> None:
    async def run() -> None:
        async def silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
            await reader.read()  # takes the command, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pipe = RedisPipe(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
        try:
            with pytest.raises(redis.TimeoutError):
                await pipe.execute([("PING",)])
            assert not pipe.connected
        finally:
            server.close()

    asyncio.run(run())


def test_a_pooled_connection_dead_since_a_restart_is_replaced(tmp_path: Path) -> None:
    """Redis restarts between two batches: the idle pooled connection is dead, the batch goes
    once more on a new one; with Redis down, the caller gets a connection error."""
    proc, url = start_redis_server(tmp_path)
    port = int(url.rsplit(":", 1)[1])

    async def run() -> tuple[list[Any], list[Any]]:
        pool = PipePool(f"{url}/0")
        try:
            before = await pool.execute([("SET", "k", "1"), ("INCR", "k")])
            proc.stop()
            restarted.append(start_redis_server(tmp_path, port=port)[0])
            after = await pool.execute([("SET", "k", "5"), ("INCR", "k")])
            restarted[0].stop()
            return before, after
        finally:
            pool.close()

    restarted: list[Any] = []
    try:
        before, after = asyncio.run(run())
    finally:
        for server in [proc, *restarted]:
            server.stop()
    assert before == [b"OK", 2] and after == [b"OK", 6]

    async def down() -> None:
        with pytest.raises(redis.ConnectionError):
            await PipePool(f"{url}/0").execute([("PING",)])

    asyncio.run(down())


def test_reply_errors_are_redis_py_exceptions(redis_base_url: str) -> None:
    from hybrid_router.router.core.lua import LuaScript, run_scripts

    key = f"pipe-test-{uuid.uuid4().hex}"
    script = LuaScript("return redis.call('INCR', KEYS[1])")

    async def run() -> list[Any]:
        pool = PipePool(f"{redis_base_url}/0")
        try:
            await pool.execute([("SET", key, "text")])
            return await run_scripts(pool, [(script, [key], []), (script, [key + "n"], [])])
        finally:
            await pool.execute([("DEL", key, key + "n")])
            pool.close()

    failed, counted = asyncio.run(run())
    assert isinstance(failed, redis.ResponseError) and "not an integer" in str(failed)
    assert counted == 1
