"""The SSE hot path: write one answer as ``chat.completion.chunk`` events (or as a Response's
events, `hybrid_router.simulator.responses.ResponsesEncoder`).

Why it is shaped like this: at ``tokens_per_s=0`` the chunks of up to ``MAX_CHUNKS_PER_WRITE``
tokens are joined into one write (one ASGI send, one socket write) so the simulator sustains tens
of thousands of chunks per second on one core; with pacing, every token that is due is written
at once, so timer jitter never makes the stream fall behind its rate. A watcher task waits for
``http.disconnect`` so a client that goes away stops generation at once (counted as aborted),
and a drop fault ends the ASGI call without finishing the chunked body, which makes the server
close the connection mid-stream exactly like a broken upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from hybrid_router.simulator.chat import ChunkEncoder
from hybrid_router.simulator.generation import Answer
from hybrid_router.simulator.httpio import Message, Receive, Send
from hybrid_router.simulator.responses import ResponsesEncoder

MAX_CHUNKS_PER_WRITE = 256
SHORT_SLEEP_S = 0.25
SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]

Outcome = Literal["completed", "aborted", "dropped"]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _sleep_or_disconnect(watcher: asyncio.Task[None], delay: float) -> bool:
    """Sleep ``delay`` seconds; True if the client disconnected meanwhile.

    Short (inter-token) sleeps use a bare ``asyncio.sleep``, several times cheaper than
    ``asyncio.wait``; a disconnect is then noticed at the next token at the latest. Long sleeps
    (time to first token, slow rates) wake up as soon as the client goes away.
    """
    if delay < SHORT_SLEEP_S:
        await asyncio.sleep(delay)
    else:
        await asyncio.wait((watcher,), timeout=delay)
    return watcher.done()


async def stream_answer(
    send: Send,
    receive: Receive,
    *,
    answer: Answer,
    encoder: ChunkEncoder | ResponsesEncoder,
    ttft: float,
    tps: float,
    drop_after: int | None,
    headers: list[tuple[bytes, bytes]],
) -> Outcome:
    """Stream ``answer``; returns how the stream ended."""
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await send({"type": "http.response.start", "status": 200,
                    "headers": SSE_HEADERS + headers})
        if ttft > 0 and await _sleep_or_disconnect(watcher, ttft):
            return "aborted"
        # Text tokens, or a tool-call answer's deltas: one chunk each, paced alike.
        tokens: list[Any] = answer.tokens
        encode: Callable[[list[Any]], bytes] = encoder.tokens
        if answer.tool_deltas:
            tokens, encode = answer.tool_deltas, encoder.tool_deltas
        n = len(tokens)
        dropping = drop_after is not None and drop_after < n
        limit = drop_after if dropping and drop_after is not None else n
        t0 = loop.time()
        pending: list[bytes] = [encoder.role()]
        i = 0
        while True:
            step = int((loop.time() - t0) * tps) + 1 - i if tps > 0 else MAX_CHUNKS_PER_WRITE
            due = min(limit, i + step)
            if due > i:
                pending.append(encode(tokens[i:due]))
                i = due
            if i >= limit:
                break
            await send({"type": "http.response.body", "body": b"".join(pending),
                        "more_body": True})
            pending = []
            if watcher.done():
                return "aborted"
            if tps > 0:
                delay = t0 + i / tps - loop.time()
                if delay > 0 and await _sleep_or_disconnect(watcher, delay):
                    return "aborted"
            else:
                await asyncio.sleep(0)
        if dropping:
            await send({"type": "http.response.body", "body": b"".join(pending),
                        "more_body": True})
            # Give the transport a moment to flush what was sent before the connection closes.
            await asyncio.sleep(0)
            return "dropped"
        pending.append(encoder.finish(answer.finish_reason))
        if encoder.include_usage:
            pending.append(encoder.usage(answer.prompt_tokens, answer.completion_tokens))
        pending.append(encoder.done())
        if watcher.done():
            return "aborted"
        await send({"type": "http.response.body", "body": b"".join(pending), "more_body": False})
        return "completed"
    finally:
        watcher.cancel()
