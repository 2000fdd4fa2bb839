"""Run a Redis read plan: a generator that yields batches of commands, is sent their replies,
and returns what it computed from them. One plan serves the CLI (sync client) and the API
(async client): `run_plan` and `arun_plan` send each batch as one pipelined round trip."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

T = TypeVar("T")
Command = tuple[str, tuple[Any, ...]]
Plan = Generator[list[Command], list[Any], T]


def _queue(pipe: Any, commands: list[Command]) -> None:
    for name, args in commands:
        getattr(pipe, name)(*args)


def run_plan(client: redis.Redis, plan: Plan[T]) -> T:
    """Run `plan` on a sync client."""
    commands = next(plan)
    while True:
        pipe = client.pipeline(transaction=False)
        _queue(pipe, commands)
        try:
            commands = plan.send(pipe.execute() if commands else [])
        except StopIteration as stop:
            result: T = stop.value
            return result


async def arun_plan(client: aioredis.Redis, plan: Plan[T]) -> T:
    """Run `plan` on an async client."""
    commands = next(plan)
    while True:
        pipe = client.pipeline(transaction=False)
        _queue(pipe, commands)
        try:
            commands = plan.send(await pipe.execute() if commands else [])
        except StopIteration as stop:
            result: T = stop.value
            return result
