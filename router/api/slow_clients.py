"""Slow clients: a request's head must arrive within `ROUTER_HTTP_HEADER_TIMEOUT_S` and its body
within `ROUTER_HTTP_BODY_TIMEOUT_S`; a client that is slower gets a 408 and its connection closed.

Why: uvicorn has a keep-alive timeout (armed once a response is sent, and cancelled by any byte
received) but no read timeout (proposed as ``--timeout-request-start`` and
``--timeout-request-complete`` in uvicorn issue #157, never built). A
connection that never finishes its request head (slowloris) was held for ever (1,500 of them
for 30 s: none closed), and so was a request whose body never arrives (`Content-Length: 100`,
10 bytes sent: the app waits in `receive()` for ever). Each held connection costs a socket, a
file descriptor and memory, and enough of them lock everyone out.

Two layers, because the two deadlines live in different places:

* The head is read by the HTTP protocol before any ASGI app runs, so its deadline is a protocol
  subclass (`GuardedHttpProtocol`, given to uvicorn as ``http=PROTOCOL``). A timer is armed when
  a connection opens and again whenever a response has been sent (the connection now waits for
  the next request's head); when it fires and no new request has started since, the connection
  is closed, with a 408 if part of a request had arrived. An idle keep-alive connection is closed earlier by
  uvicorn's own keep-alive timeout; a request being served (a long SSE stream) is never cut.
* The body is read through ASGI `receive()`, so its deadline is an ASGI middleware
  (`BodyReadTimeout`): `receive()` fails with a 408 once the body has not arrived in full by
  its deadline (the app's error handlers answer it, or this middleware when the app did not),
  with ``connection: close``. Requests without a body (no length, no transfer coding) pass
  untouched, and so does everything after the body's last byte (an SSE response waits in
  `receive()` for the client to go away).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpProtocol
except ImportError:  # pragma: no cover - uvicorn without httptools speaks h11
    from uvicorn.protocols.http.h11_impl import (  # type: ignore[assignment]
        H11Protocol as _HttpProtocol,
    )

from hybrid_router.settings import Settings

# What uvicorn is given as ``http=``: an import string, so multi-process workers load it too.
PROTOCOL = "hybrid_router.router.api.slow_clients:GuardedHttpProtocol"


def _timeout_body(message: str, param: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": "request_timeout"}})


def _head_timeout_response(seconds: float) -> bytes:
    body = _timeout_body(f"the request head was not received within {seconds:g} s "
                         "(ROUTER_HTTP_HEADER_TIMEOUT_S)", "headers")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


class GuardedHttpProtocol(_HttpProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request head (see module doc)."""

    header_timeout_s: ClassVar[float] = 10.0  # set by `configure` from the settings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._head_begun = True
        super().data_received(data)

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        if self.transport.is_closing():
            return
        self._head_cycle: Any = self.cycle  # a new request head replaces the cycle
        self._head_begun = False  # any byte since: a request began (else the line is idle)
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        cycle = self.cycle
        if cycle is not self._head_cycle:
            return  # a request head arrived in time
        if cycle is not None and not cycle.response_complete:
            return  # a request is being served
        if not self.transport.is_closing():
            if self._head_begun:  # an idle connection is closed without an unasked answer
                self.transport.write(_head_timeout_response(self.header_timeout_s))
            self.transport.close()


def configure(settings: Settings) -> None:
    """Give the protocol its deadline (call in the API's process before it serves)."""
    GuardedHttpProtocol.header_timeout_s = settings.http_header_timeout_s


class BodyTimedOut(HTTPException):
    """Raised from `receive` when the body is late; FastAPI re-raises HTTPExceptions from body
    parsing, so the app's error handlers render it (as a 408, `request_timeout`)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body was not received within {seconds:g} s "
                              "(ROUTER_HTTP_BODY_TIMEOUT_S)", headers={"connection": "close"})


def _has_body(scope: Scope) -> bool:
    return any(name in (b"content-length", b"transfer-encoding") and value not in (b"0",)
               for name, value in scope.get("headers", ()))


class BodyReadTimeout:
    """ASGI middleware: the whole request body must arrive within `timeout_s` (see module doc)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False
        started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimedOut(self.timeout_s) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyTimedOut as exc:
            if started:
                raise
            body = _timeout_body(str(exc.detail), "body")
            await send({"type": "http.response.start", "status": 408, "headers": [
                (b"content-type", b"application/json"), (b"connection", b"close"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
