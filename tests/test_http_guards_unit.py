"""Unit tests of the body deadline (hybrid_router.router.api.http_guards.BodyGuard) on a bare ASGI app:
the one timer per loop must still end a body that never comes with a 408, leave a body that
arrived alone, and not turn somebody else's cancel (a client gone) into a 408."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest

from hybrid_router.router.api.http_guards import BodyGuard, BodyRefused, _too_late

SCOPE = {"type": "http", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", b"10")]}


async def _reads_body(scope: Any, receive: Any, send: Any) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _run(app: Any, receive: Any, timeout_s: float = 0.2) -> list[MutableMapping[str, Any]]:
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and any(
                m["type"] == "http.response.start" for m in sent):
            raise RuntimeError("a second response start")  # as uvicorn refuses it
        sent.append(message)

    async def main() -> None:
        await asyncio.wait_for(BodyGuard(app, 1 << 20, timeout_s)(SCOPE, receive, send), 5)

    asyncio.run(main())
    return sent


def test_a_body_that_never_arrives_gets_a_408_after_the_deadline() -> None:
    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent = _run(_reads_body, never, timeout_s=0.2)
    assert sent[0]["status"] == 408
    assert b'"request_timeout"' in sent[1]["body"]


def test_a_body_in_parts_is_read_whole_and_the_deadline_then_ends() -> None:
    parts = [{"type": "http.request", "body": b"12345", "more_body": True},
             {"type": "http.request", "body": b"67890", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if parts:
            return parts.pop(0)
        await asyncio.sleep(0.5)  # after the body: waits past the deadline untouched
        return {"type": "http.disconnect"}

    async def reads_then_waits(scope: Any, receive_: Any, send: Any) -> None:
        await _reads_body(scope, receive_, send)
        assert (await receive_())["type"] == "http.disconnect"

    sent = _run(reads_then_waits, receive, timeout_s=0.2)
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [202]


def test_a_deadline_passed_between_two_reads_fails_the_next_read() -> None:
    parts = [{"type": "http.request", "body": b"12345", "more_body": True}]

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    async def slow_app(scope: Any, receive_: Any, send: Any) -> None:
        await receive_()
        await asyncio.sleep(0.6)  # busy past the deadline (0.2 s, looked at every 0.25 s)
        with pytest.raises(BodyRefused):
            await receive_()
        raise _too_late(0.2)

    sent = _run(slow_app, receive, timeout_s=0.2)
    assert sent[0]["status"] == 408


def test_another_cancel_stays_a_cancel() -> None:
    async def main() -> None:
        waiting = asyncio.Event()

        async def never() -> dict[str, Any]:
            waiting.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: MutableMapping[str, Any]) -> None:
            raise AssertionError(f"nothing may be sent: {message}")

        task = asyncio.create_task(BodyGuard(_reads_body, 1 << 20, 30.0)(SCOPE, never, send))
        await asyncio.wait_for(waiting.wait(), 5)
        task.cancel()  # e.g. the server cancelling the app of a client that went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_an_answer_already_begun_is_not_answered_twice() -> None:
    async def never() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def answers_then_reads(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()

    with pytest.raises(BodyRefused):
        _run(answers_then_reads, never, timeout_s=0.2)
