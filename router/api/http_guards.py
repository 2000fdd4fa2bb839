"""What a request must do before the app reads it: its head must arrive within
`ROUTER_HTTP_HEADER_TIMEOUT_S`, its body within `ROUTER_HTTP_BODY_TIMEOUT_S` (a client that is
slower gets a 408 and its connection closed), and its body must be at most
`ROUTER_MAX_BODY_BYTES` (a 413 before any parsing).

Why: uvicorn has a keep-alive timeout (armed once a response is sent, and cancelled by any byte
received) but no read timeout (proposed as ``--timeout-request-start`` and
``--timeout-request-complete`` for uvicorn, never built). A
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
* The body is read through ASGI `receive()`, so its deadline and its size limit are one ASGI
  middleware (`BodyGuard`): `receive()` fails with a 408 once the body has not arrived in full by
  its deadline (the app's error handlers answer it, or this middleware when the app did not),
  with ``connection: close``. One timer per event loop looks at the pending head and body
  deadlines four times a second (`_Deadlines`), so a deadline fires up to 0.25 s late and a
  request pays a dict insert for it, not a timer of its own. Requests without a body (no
  length, no transfer coding) pass
  untouched, and so does everything after the body's last byte (an SSE response waits in
  `receive()` for the client to go away).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Protocol

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
PROTOCOL = "hybrid_router.router.api.http_guards:GuardedHttpProtocol"


def _error_body(message: str, param: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": code}})


def _head_timeout_response(seconds: float) -> bytes:
    body = _error_body(f"the request head was not received within {seconds:g} s "
                       "(ROUTER_HTTP_HEADER_TIMEOUT_S)", "headers", "request_timeout")
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


class _Expiring(Protocol):
    def deadline_passed(self) -> None: ...


class _Deadlines:
    """The deadlines of one event loop (request heads and bodies), looked at by one timer every
    `tick_s` while any is pending: arming one is a dict insert, and a deadline fires up to
    `tick_s` late.

    Why not a timer each: ``asyncio.timeout_at`` around each body `receive` cost about 10 us
    per request with a body (a timeout object, a timer scheduled and cancelled, a wrapper
    around every `send`), and a head timer re-armed after every response (uvloop's
    ``call_later`` and ``cancel``) 2-3 us per request; together ~10 % of the intake's CPU."""

    TICK_S = 0.25

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[_Expiring, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        """The deadlines of `loop` (one per loop; those of closed loops are dropped)."""
        deadlines = _PER_LOOP.get(loop)
        if deadlines is None:
            for old in [old for old in _PER_LOOP if old.is_closed()]:
                del _PER_LOOP[old]
            deadlines = _PER_LOOP[loop] = cls(loop)
        return deadlines

    def add(self, owner: _Expiring, seconds: float) -> None:
        """`owner.deadline_passed()` once `seconds` have passed (replaces its earlier one)."""
        self.pending[owner] = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_later(self.TICK_S, self._check)

    def discard(self, owner: _Expiring) -> None:
        self.pending.pop(owner, None)

    def _check(self) -> None:
        now = self.loop.time()
        for owner in [owner for owner, at in self.pending.items() if at <= now]:
            del self.pending[owner]
            owner.deadline_passed()
        self._timer = self.loop.call_later(self.TICK_S, self._check) if self.pending else None


_PER_LOOP: dict[asyncio.AbstractEventLoop, _Deadlines] = {}


class GuardedHttpProtocol(_HttpProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request head (see module doc)."""

    header_timeout_s: ClassVar[float] = 10.0  # set by `configure` from the settings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadlines = _Deadlines.of(self.loop)
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
        if self.transport.is_closing():
            self._cancel_head_deadline()
            return
        self._head_cycle: Any = self.cycle  # a new request head replaces the cycle
        self._head_begun = False  # any byte since: a request began (else the line is idle)
        self._deadlines.add(self, self.header_timeout_s)

    def _cancel_head_deadline(self) -> None:
        deadlines = getattr(self, "_deadlines", None)
        if deadlines is not None:
            deadlines.discard(self)

    def deadline_passed(self) -> None:
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


class BodyRefused(HTTPException):
    """Raised from `receive` when the body is too large (413) or late (408); FastAPI re-raises
    HTTPExceptions from body parsing, so the app's error handlers render it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers=headers)

    @property
    def code(self) -> str:
        return "body_too_large" if self.status_code == 413 else "request_timeout"


def _too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"request body is larger than the limit of {limit} bytes "
                            "(ROUTER_MAX_BODY_BYTES); send a smaller request")


def _too_late(seconds: float) -> BodyRefused:
    return BodyRefused(408, f"the request body was not received within {seconds:g} s "
                            "(ROUTER_HTTP_BODY_TIMEOUT_S)", headers={"connection": "close"})


def _declared_length(scope: Scope) -> tuple[bool, int | None]:
    """(whether a body comes, its one trustworthy Content-Length or None when the bytes must
    be counted: a transfer coding, several or invalid lengths)."""
    declared: int | None = None
    length_headers = 0
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length_headers += 1
            try:
                declared = int(value)
            except ValueError:
                declared = None
        elif name == b"transfer-encoding":
            length_headers += 2  # a transfer coding next to a length: count the bytes
    if length_headers == 0 or (length_headers == 1 and declared == 0):
        return False, 0  # no length and no transfer coding means no body (a GET, say)
    trusted = length_headers == 1 and declared is not None and declared >= 0
    return True, declared if trusted else None


class _GuardedBody:
    """One request's body `receive`: its deadline (when it passes, `_Deadlines`, the `receive`
    waiting for the body is cancelled and raises the 408; a later one raises it at once) and,
    where the server does not hand over a declared length, its byte count (413)."""

    __slots__ = ("_deadlines", "_receive", "_timeout_s", "_waiter", "count", "done", "late",
                 "max_bytes", "seen")

    def __init__(self, receive: Receive, max_bytes: int, timeout_s: float, count: bool,
                 deadlines: _Deadlines) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        self.count = count
        self.seen = 0
        self._timeout_s = timeout_s
        self._deadlines = deadlines
        self.done = False  # the body's last message was received (or the app is done)
        self.late = False  # the deadline passed before that
        self._waiter: asyncio.Task[Any] | None = None  # the task waiting in `receive`, if any
        deadlines.add(self, timeout_s)

    def deadline_passed(self) -> None:
        if self.done:
            return
        self.late = True
        if self._waiter is not None:
            self._waiter.cancel()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self._deadlines.discard(self)

    async def receive(self) -> Message:
        if self.done:
            return await self._receive()
        if self.late:
            raise _too_late(self._timeout_s)
        task = self._waiter = asyncio.current_task()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            # Our cancel (and nobody else's, e.g. a client gone): the deadline passed.
            if self.late and task is not None and task.uncancel() == 0:
                raise _too_late(self._timeout_s) from None
            raise
        finally:
            self._waiter = None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.close()
        if self.count and message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.max_bytes:
                raise _too_large(self.max_bytes)
        return message


class BodyGuard:
    """ASGI middleware: a request body is at most `max_bytes` (else 413, before parsing) and
    arrives in full within `timeout_s` (else 408 and ``connection: close``; see module doc)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        has_body, declared = _declared_length(scope) if scope["type"] == "http" else (False, 0)
        if not has_body:
            await self.app(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await _answer(send, _too_large(self.max_bytes))
            return
        guarded = _GuardedBody(receive, self.max_bytes, self.timeout_s, declared is None,
                               _Deadlines.of(asyncio.get_running_loop()))
        try:
            await self.app(scope, guarded.receive, send)
        except BodyRefused as exc:
            # The app did not answer it (the fast paths read bodies outside FastAPI's error
            # handlers): answer it here, unless the app had begun an answer of its own (the
            # server refuses a second response start; nothing more can be said then). Not
            # tracked per `send`: that wrapper cost every chunk of a streamed answer.
            try:
                await _answer(send, exc)
            except RuntimeError:
                raise exc from None
        finally:
            guarded.close()


async def _answer(send: Send, exc: BodyRefused) -> None:
    """The error answer when the app did not give one (OpenAI's shape, like `api.errors`)."""
    body = _error_body(str(exc.detail), "body", exc.code)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
