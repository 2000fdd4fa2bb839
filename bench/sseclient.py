"""A lean asyncio HTTP/1.1 client for streaming benchmarks (one connection per request).

With hundreds of concurrent streams on a 2-core machine, a full-featured client (httpx) spends
more CPU per streamed line than the router does, so TTFT figures would measure the client's own
queueing. This reads status, headers and a chunked or sized body straight off the socket and
yields body lines; the direct baseline and the router are read with the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import orjson


class HTTPStatusError(RuntimeError):
    pass


async def stream_lines(
    url: str, *, method: str = "POST", json: object | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[bytes]:
    """Send one request and yield the response body line by line (without line endings)."""
    parsed = urlparse(url)
    reader, writer = await asyncio.open_connection(parsed.hostname, parsed.port or 80)
    try:
        body = orjson.dumps(json) if json is not None else b""
        lines = [f"{method} {parsed.path or '/'} HTTP/1.1", f"Host: {parsed.netloc}",
                 "Connection: close", "Accept: text/event-stream"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if json is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        header_lines = head.lower().split(b"\r\n")
        chunked = any(h.startswith(b"transfer-encoding:") and b"chunked" in h for h in header_lines)
        length = next((int(h.split(b":", 1)[1]) for h in header_lines
                       if h.startswith(b"content-length:")), None)
        if status >= 400:
            raise HTTPStatusError(f"{method} {url} -> {status}")
        buffer = b""
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    break
                data = await reader.readexactly(size + 2)
                buffer += data[:-2]
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    yield line.rstrip(b"\r")
        else:
            data = await (reader.readexactly(length) if length is not None else reader.read())
            buffer += data
        for line in buffer.split(b"\n"):
            if line:
                yield line.rstrip(b"\r")
    finally:
        writer.close()


async def request_json(url: str, *, method: str = "POST", json: object | None = None,
                       headers: dict[str, str] | None = None) -> object:
    """One request whose response is a JSON document."""
    body = b"".join([line async for line in stream_lines(url, method=method, json=json,
                                                          headers=headers)])
    return orjson.loads(body)


FINAL_TYPES = ("done", "error", "cancelled")


async def router_events(url: str, headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
    """The events of a router ``/events`` stream (``GET url``), parsed, up to and including
    the final one (``done``, ``error`` or ``cancelled``)."""
    async for line in stream_lines(url, method="GET", headers=headers):
        if not line.startswith(b"data: "):
            continue
        event = orjson.loads(line[6:])
        yield event
        if event["type"] in FINAL_TYPES:
            return
