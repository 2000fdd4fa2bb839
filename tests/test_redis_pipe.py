"""`workers.redis_pipe.RedisPipe` (the publisher's pipelined connection) against real Redis
servers: replies in order, errors as values, AUTH and SELECT, and a lost server."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import hiredis
import pytest
import redis

from tests.support import start_redis_server
from workers.redis_pipe import RedisPipe


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


def test_only_tcp_urls() -> None:
    with pytest.raises(ValueError):
        RedisPipe("unix:///tmp/redis.sock")
