"""Running async code written once over blocking I/O, without an event loop.

A coroutine that awaits only coroutines which never suspend (their I/O is a blocking call)
runs to its end on the first ``send(None)``. That lets one ``async def`` implementation serve
both kinds of caller: asyncio callers await it over asyncio I/O, sync callers run it here over
blocking I/O (the redis-py sync client, httpx's sync client). Awaiting anything that really
suspends (``asyncio.sleep``, a future) from blocking I/O is a bug, reported as such.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The result of `coro`, which must finish without suspending."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("blocking code awaited something that suspends")


def iterate_blocking(agen: AsyncIterator[T]) -> Iterator[T]:
    """The items of the async generator `agen`, whose steps must finish without suspending;
    closing the iterator closes `agen` (its ``finally`` blocks run)."""
    try:
        while True:
            try:
                yield run_blocking(agen.__anext__())  # type: ignore[arg-type]
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            run_blocking(aclose())
