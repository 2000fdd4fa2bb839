"""`ScriptCoalescer` against real Redis: the calls of one loop iteration share one pipeline and
each caller gets its own answer (or error), a lone call is a plain EVALSHA, a flushed script
cache is reloaded, Redis being away reaches every caller, and a cancelled leader strands nobody."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.coalesce import ScriptCoalescer
from hybrid_router.router.core.lua import LuaScript
from hybrid_router.router.core.redis_pipe import PipePool

# KEYS[1]: a counter; ARGV[1]: 'fail' to raise -> the counter after INCR
INCR = LuaScript("""
if ARGV[1] == 'fail' then return redis.error_reply('asked to fail') end
return redis.call('INCR', KEYS[1])
""")


def run(scenario: Callable[[aioredis.Redis], Any], url: str) -> Any:
    async def main() -> Any:
        client = aioredis.Redis.from_url(url)
        try:
            return await scenario(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


class CountingClient:
    """Counts the pipelines and the single commands a coalescer sends through a client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client, self.pipelines, self.singles = client, 0, 0

    def pipeline(self, **kw: Any) -> Any:
        self.pipelines += 1
        return self.client.pipeline(**kw)

    async def evalsha(self, *args: Any) -> Any:
        self.singles += 1
        return await self.client.evalsha(*args)

    async def eval(self, *args: Any) -> Any:
        self.singles += 1
        return await self.client.eval(*args)


@pytest.fixture
def url(redis_base_url: str) -> str:
    return f"{redis_base_url}/0"


def test_one_iteration_shares_one_pipeline_and_answers_each_caller(url: str) -> None:
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> tuple[list[Any], CountingClient]:
        await INCR.run_async(client, [key + "x"], ["ok"])  # load the script
        counting = CountingClient(client)
        coalescer = ScriptCoalescer(counting)  # type: ignore[arg-type]
        calls = [coalescer.run(INCR, [key], ["fail" if i == 3 else "ok"]) for i in range(8)]
        return await asyncio.gather(*calls, return_exceptions=True), counting

    results, counting = run(scenario, url)
    assert isinstance(results[3], redis.exceptions.ResponseError)
    assert "asked to fail" in str(results[3])
    assert sorted(r for i, r in enumerate(results) if i != 3) == [1, 2, 3, 4, 5, 6, 7]
    assert (counting.pipelines, counting.singles) == (1, 0)


def test_a_lone_call_is_a_plain_evalsha(url: str) -> None:
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> tuple[list[Any], CountingClient]:
        counting = CountingClient(client)
        coalescer = ScriptCoalescer(counting)  # type: ignore[arg-type]
        return [await coalescer.run(INCR, [key], ["ok"]) for _ in range(3)], counting

    results, counting = run(scenario, url)
    assert results == [1, 2, 3]
    assert counting.pipelines == 0


def test_a_flushed_script_cache_is_reloaded(url: str) -> None:
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> list[Any]:
        await client.script_flush()
        coalescer = ScriptCoalescer(client)
        return list(await asyncio.gather(*(coalescer.run(INCR, [key], ["ok"]) for _ in range(5))))

    assert sorted(run(scenario, url)) == [1, 2, 3, 4, 5]


class CountingPool(PipePool):
    """Counts the batches a coalescer sends over raw connections."""

    batches = 0

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]:
        self.batches += 1
        return await super().execute(commands, timeout_s)


def test_over_raw_connections_the_same_answers(url: str) -> None:
    """With a `PipePool` the calls of one iteration are one raw batch, errors are redis-py's
    exception classes, and a flushed script cache is reloaded."""
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> tuple[list[Any], list[Any], int]:
        await client.script_flush()
        pool = CountingPool(url)
        coalescer = ScriptCoalescer(client, pool)
        try:
            calls = [coalescer.run(INCR, [key], ["fail" if i == 3 else "ok"]) for i in range(8)]
            together = await asyncio.gather(*calls, return_exceptions=True)
            batches = pool.batches
            alone = [await coalescer.run(INCR, [key], ["ok"]) for _ in range(2)]
            return list(together), alone, batches
        finally:
            pool.close()

    together, alone, batches = run(scenario, url)
    assert isinstance(together[3], redis.exceptions.ResponseError)
    assert "asked to fail" in str(together[3])
    assert sorted(r for i, r in enumerate(together) if i != 3) == [1, 2, 3, 4, 5, 6, 7]
    assert batches == 2  # the batch, then the script load with the batch again
    assert alone == [8, 9]


@pytest.mark.parametrize("raw", [False, True], ids=["redis-py", "raw"])
def test_redis_away_reaches_every_caller(raw: bool) -> None:
    async def scenario() -> list[Any]:
        client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        coalescer = ScriptCoalescer(client, PipePool("redis://127.0.0.1:1/0") if raw else None)
        try:
            return list(await asyncio.gather(
                *(coalescer.run(INCR, ["k"], ["ok"]) for _ in range(4)), return_exceptions=True))
        finally:
            await client.aclose()

    results = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results


def test_a_cancelled_leader_strands_no_follower(url: str) -> None:
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> tuple[bool, list[Any]]:
        coalescer = ScriptCoalescer(client)
        joined: list[int] = []

        async def cancel_leader() -> None:  # runs after the followers joined, before the send
            joined.append(len(coalescer._gathering or []))
            leader.cancel()

        # One iteration: the leader starts gathering, three followers join, the leader is cancelled.
        leader = asyncio.ensure_future(coalescer.run(INCR, [key], ["ok"]))
        followers = [asyncio.ensure_future(coalescer.run(INCR, [key], ["ok"])) for _ in range(3)]
        canceller = asyncio.ensure_future(cancel_leader())
        done = await asyncio.wait_for(asyncio.gather(*followers), 10)
        await canceller
        assert joined == [3]
        return leader.cancelled(), list(done)

    cancelled, results = run(scenario, url)
    assert cancelled
    assert sorted(results) == [1, 2, 3]
