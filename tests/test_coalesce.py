"""`ScriptCoalescer` against real Redis: the calls of one loop iteration share one raw batch and
each caller gets its own answer (or error), a lone call is a batch of one, a flushed script
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
from hybrid_router.router.core.redis_io import PipePool

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


@pytest.fixture
def url(redis_base_url: str) -> str:
    return f"{redis_base_url}/0"


class CountingPool(PipePool):
    """Counts the batches a coalescer sends over raw connections."""

    batches = 0

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]:
        self.batches += 1
        return await super().execute(commands, timeout_s)


@pytest.mark.parametrize("flushed", [False, True], ids=["loaded", "flushed"])
def test_one_iteration_shares_one_batch_and_each_caller_gets_its_answer(url: str, flushed: bool
                                                                         ) -> None:
    """The calls of one iteration are one raw batch (with Redis's script cache flushed: that
    batch, then the script load with the calls again); errors are redis-py's exception classes;
    a lone call is a batch of one."""
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(client: aioredis.Redis) -> tuple[list[Any], int, list[Any], int]:
        await (client.script_flush() if flushed else client.script_load(INCR.source))
        pool = CountingPool(url)
        coalescer = ScriptCoalescer(pool)
        try:
            calls = [coalescer.run(INCR, [key], ["fail" if i == 3 else "ok"]) for i in range(8)]
            together = await asyncio.gather(*calls, return_exceptions=True)
            batches = pool.batches
            alone = [await coalescer.run(INCR, [key], ["ok"]) for _ in range(3)]
            return list(together), batches, alone, pool.batches - batches
        finally:
            pool.close()

    together, batches, alone, lone_batches = run(scenario, url)
    assert isinstance(together[3], redis.exceptions.ResponseError)
    assert "asked to fail" in str(together[3])
    assert sorted(r for i, r in enumerate(together) if i != 3) == [1, 2, 3, 4, 5, 6, 7]
    assert batches == (2 if flushed else 1)
    assert alone == [8, 9, 10] and lone_batches == 3


def test_redis_away_reaches_every_caller() -> None:
    async def scenario() -> list[Any]:
        coalescer = ScriptCoalescer(PipePool("redis://127.0.0.1:1/0"))
        return list(await asyncio.gather(
            *(coalescer.run(INCR, ["k"], ["ok"]) for _ in range(4)), return_exceptions=True))

    results = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results


def test_a_cancelled_leader_strands_no_follower(url: str) -> None:
    key = f"t{uuid.uuid4().hex}:n"

    async def scenario(_client: aioredis.Redis) -> tuple[bool, list[Any]]:
        coalescer = ScriptCoalescer(PipePool(url))
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
