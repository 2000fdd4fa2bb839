"""Send the Lua script calls that one event-loop iteration makes as one Redis pipeline.

Why: under load the intake API reaches `AsyncRequestStore.create` for many requests in the same
loop iteration (uvloop reads every ready connection, then runs their handlers). Sent one by one,
each call costs a send system call, a wake-up for its reply and redis-py's per-command
machinery, in the API and in Redis: the largest part of a ``POST /v1/requests`` after the HTTP
floor (bench_intake). Sent together, they share one of each.

The first call of an iteration leads: it yields to the loop once, so that the calls made in the
same iteration can join it, then sends them all in one non-transactional pipeline (each script
is atomic on its own, exactly as when sent alone). A call nobody joined goes out as the plain
EVALSHA it always was, so a lightly loaded API pays only that one yield.

The calls go over a `PipePool`'s raw connections (`hybrid_router.router.core.redis_io.run_scripts`,
which also reloads a script Redis lost): redis-py's per-command machinery costs more CPU than
the call itself on this path.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hybrid_router.router.core.redis_io import LuaScript, PipePool, run_scripts
from hybrid_router.router.core.replica_wait import ReplicaWait

_Call = tuple[LuaScript, list[str], list[Any], "asyncio.Future[Any]", bool]


class ScriptCoalescer:
    """Runs `LuaScript`s on a `PipePool`, coalescing the calls of one loop iteration.

    A `durable` call (a new request) makes its batch end with the `ReplicaWait` command, on the
    same connection: its caller hears back once a replica has the batch's writes."""

    def __init__(self, pool: PipePool, replicas: ReplicaWait | None = None) -> None:
        self.pool = pool
        self.replicas = replicas
        self._gathering: list[_Call] | None = None  # the followers of the current leader
        self._tasks: set[asyncio.Task[None]] = set()  # pipelines in flight (strong references)

    async def run(self, script: LuaScript, keys: list[str], args: list[Any],
                  durable: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        if self._gathering is not None:
            future: asyncio.Future[Any] = loop.create_future()
            self._gathering.append((script, keys, args, future, durable))
            return await future
        followers: list[_Call] = []
        self._gathering = followers
        try:
            await asyncio.sleep(0)  # the other handlers of this iteration run and join
        except asyncio.CancelledError:
            self._gathering = None
            if followers:
                self._spawn(followers)  # this leader was cancelled: its followers still go
            raise
        self._gathering = None
        durable = durable and self.replicas is not None and self.replicas.may_wait(self.pool)
        if not followers and not durable:
            result = (await run_scripts(self.pool, [(script, keys, args)]))[0]
            if isinstance(result, Exception):
                raise result
            return result
        own: asyncio.Future[Any] = loop.create_future()
        # In a task of its own, so that a cancelled leader cannot leave its followers waiting.
        self._spawn([(script, keys, args, own, durable), *followers])
        return await own

    def _spawn(self, calls: list[_Call]) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(calls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, calls: list[_Call]) -> None:
        try:
            wait = None
            if self.replicas is not None and any(call[4] for call in calls):
                wait = await self.replicas.acommand(self.pool)
            results = await run_scripts(self.pool, [call[:3] for call in calls], then=wait)
            if wait is not None and self.replicas is not None:
                self.replicas.confirmed(wait, results.pop())
        except asyncio.CancelledError:
            for call in calls:
                call[3].cancel()
            raise
        except Exception as exc:  # Redis away, a timeout: every caller gets the error, as alone
            for call in calls:
                if not call[3].done():
                    call[3].set_exception(exc)
            return
        for (*_, future, _durable), result in zip(calls, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
