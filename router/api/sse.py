"""Server-Sent Events helpers: the wire format of one event, and a response that notices when the
client goes away.

`SSEResponse` always watches for ``http.disconnect`` (Starlette only does so for ASGI < 2.4, and
otherwise learns of a gone client at the next write, which may be a keep-alive 15 s later). On a
disconnect the body is stopped at once and `on_disconnect` runs, shielded from cancellation —
the chat drop-in uses it to cancel the request so the upstream stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hybrid_router.router.core.records import dumps

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
        # Plain asyncio, not an anyio task group: one watcher task per response, and the body
        # streams in the request's own task (the task group's two tasks and cancel scopes per
        # response cost more CPU than the relay itself: bench_ttft shows it).
        streamer = asyncio.current_task()
        assert streamer is not None
        streaming = True
        stopped_by_watcher = False
        disconnected = False
        finished = False

        async def watch() -> None:
            nonlocal disconnected, stopped_by_watcher
            await self.listen_for_disconnect(receive)
            disconnected = True
            if streaming:  # the body is suspended inside stream_response: stop it there
                stopped_by_watcher = True
                streamer.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            try:
                await self.stream_response(send)
                finished = True
            except OSError:
                disconnected = True
            except asyncio.CancelledError:
                # Ours (the client left) is absorbed; any other cancellation goes on.
                if not stopped_by_watcher or streamer.uncancel() > 0:
                    raise
            finally:
                streaming = False
        finally:
            watcher.cancel()
            await asyncio.shield(self._cleanup(disconnected and not finished))

    async def _cleanup(self, left_early: bool) -> None:
        aclose = getattr(self._content, "aclose", None)
        if aclose is not None:
            await aclose()
        if left_early and self.on_disconnect is not None:
            await self.on_disconnect()
