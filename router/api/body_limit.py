"""ASGI middleware: refuse bodies over `Settings.max_body_bytes` with 413 before parsing."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a chunked body passes the limit; FastAPI re-raises
    HTTPExceptions from body parsing, so the error handlers render it as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def _message(limit: int) -> str:
    return (
        f"request body is larger than the limit of {limit} bytes "
        "(ROUTER_MAX_BODY_BYTES); send a smaller request"
    )


def _error_bytes(limit: int) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": _message(limit),
                "type": "invalid_request_error",
                "param": "body",
                "code": "body_too_large",
            }
        }
    )


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None  # the one Content-Length, when it can be trusted
        length_headers = 0
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length_headers += 1
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                    continue
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
            elif name == b"transfer-encoding":
                length_headers += 2  # a transfer coding next to a length: count the bytes
        if length_headers == 0 or (length_headers == 1 and declared is not None
                                   and declared >= 0):
            # No length and no transfer coding means no body (HTTP/1.1: a GET, say), and with
            # one valid length the HTTP server hands the app exactly that many bytes: nothing
            # to count, so skip the per-message wrappers below (the hot paths: every SSE chunk
            # of a long GET would otherwise pass through them).
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Any) -> None:
        body = _error_bytes(self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
