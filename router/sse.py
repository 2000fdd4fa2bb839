"""Server-Sent Events helpers: the wire format of one event, and a response that notices when the
client goes away.

`SSEResponse` always watches for ``http.disconnect`` (Starlette only does so for ASGI < 2.4, and
otherwise learns of a gone client at the next write, which may be a keep-alive 15 s later). On a
disconnect the body is stopped at once and `on_disconnect` runs, shielded from cancellation —
the chat drop-in uses it to cancel the request so the upstream stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.records import dumps

KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def format_event(event: dict[str, Any]) -> bytes:
    """``id: <seq>``, ``event: <type>`` and the event JSON as ``data``."""
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {dumps(event)}\n\n".encode()


def format_data(payload: dict[str, Any] | str) -> bytes:
    """An unnamed ``data:`` event, as OpenAI's chat stream sends them."""
    text = payload if isinstance(payload, str) else dumps(payload)
    return f"data: {text}\n\n".encode()


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops and calls `on_disconnect` when the client
    leaves before the body ended."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_disconnect: Callable[[], Awaitable[None]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self.on_disconnect = on_disconnect
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False
        disconnected = False

        async with anyio.create_task_group() as group:

            async def stream() -> None:
                nonlocal finished, disconnected
                try:
                    await self.stream_response(send)
                    finished = True
                except OSError:
                    disconnected = True
                group.cancel_scope.cancel()

            async def watch() -> None:
                nonlocal disconnected
                await self.listen_for_disconnect(receive)
                disconnected = True
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(watch)

        with anyio.CancelScope(shield=True):
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:
                await aclose()
            if disconnected and not finished and self.on_disconnect is not None:
                await self.on_disconnect()
