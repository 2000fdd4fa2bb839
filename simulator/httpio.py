"""Minimal raw-ASGI plumbing: read a body, send JSON, send an OpenAI error.

The simulator talks ASGI directly (no framework) because the streaming hot path must cost
almost nothing per chunk; these helpers keep the handlers readable without a framework.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from hybrid_router.simulator.errors import SimError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def query(scope: Scope) -> dict[str, str]:
    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_bytes(send, status, orjson.dumps(obj), JSON_HEADERS + (extra or []))


async def send_error(send: Send, err: SimError, extra: list[tuple[bytes, bytes]]) -> None:
    await send_json(send, err.status, err.body(), [*err.headers, *extra])
