"""`hybrid_router.router.core.blocking`: async code run over blocking I/O without a loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from hybrid_router.router.core.blocking import iterate_blocking, run_blocking


async def _double(value: int) -> int:
    return 2 * value


def test_a_coroutine_that_never_suspends_runs_to_its_result() -> None:
    async def outer() -> int:
        return await _double(3) + await _double(4)

    assert run_blocking(outer()) == 14


def test_awaiting_something_that_suspends_is_reported() -> None:
    async def sleeps() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspends"):
        run_blocking(sleeps())


def test_an_async_generator_is_iterated_and_closed_when_left_early() -> None:
    closed: list[bool] = []

    async def numbers() -> AsyncIterator[int]:
        try:
            for n in range(10):
                yield await _double(n)
        finally:
            closed.append(True)

    assert list(iterate_blocking(numbers())) == [2 * n for n in range(10)]
    assert closed == [True]
    items = iterate_blocking(numbers())
    assert [next(items), next(items)] == [0, 2]
    items.close()  # type: ignore[attr-defined]
    assert closed == [True, True]
