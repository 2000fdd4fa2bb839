"""The stream lane's upstream client (`hybrid_router.workers.upstream.sse` over `hybrid_router.workers.upstream.http`),
against the real simulator over HTTP and, for connection handling, a tiny real server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from hybrid_router.settings import Settings
from hybrid_router.workers.upstream.http import ConnectionPool
from hybrid_router.workers.upstream.sse import UpstreamStreamer

TIMEOUT = httpx.Timeout(10.0, read=5.0)


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}],
            "stream": True, "stream_options": {"include_usage": True}, **extra}


async def collect(streamer: UpstreamStreamer, request: dict[str, Any]) -> tuple[str, str | None,
                                                                                  dict[str, Any]]:
    text, finish, usage = "", None, {}
    async with streamer.stream(request, TIMEOUT) as chunks:
        async for chunk in chunks:
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish, usage


def test_streams_the_same_answer_as_the_sdk(settings: Settings, sim_url: str) -> None:
    prompt = f"Tell me about {uuid.uuid4().hex}"

    async def run() -> tuple[str, str | None, dict[str, Any], bool]:
        streamer = UpstreamStreamer(settings, max_connections=4)
        try:
            first = await collect(streamer, body(prompt))
            again = await collect(streamer, body(prompt))
            assert streamer.pool is not None
            reused = len(streamer.pool._idle) == 1  # one connection served both streams
            assert again == first
            return (*first, reused)
        finally:
            await streamer.aclose()

    text, finish, usage, reused = asyncio.run(run())
    sdk = openai.OpenAI(api_key="sk-test", base_url=sim_url)
    expected = sdk.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": prompt}])
    assert text == expected.choices[0].message.content and text
    assert finish == "stop"
    assert usage["completion_tokens"] == expected.usage.completion_tokens  # type: ignore[union-attr]
    assert reused


def test_http_errors_are_the_sdks_exceptions(settings: Settings) -> None:
    async def run(directive: str) -> openai.APIStatusError:
        streamer = UpstreamStreamer(settings, max_connections=2)
        try:
            with pytest.raises(openai.APIStatusError) as info:
                await collect(streamer, body(f"{directive} {uuid.uuid4().hex}"))
            return info.value
        finally:
            await streamer.aclose()

    limited = asyncio.run(run("[[sim:fail=429,retry_after=7]]"))
    assert isinstance(limited, openai.RateLimitError)
    assert limited.status_code == 429 and limited.response.headers["retry-after"] == "7"
    assert "429" in limited.message
    broken = asyncio.run(run("[[sim:fail=503]]"))
    assert isinstance(broken, openai.InternalServerError) and broken.status_code == 503


def test_idle_upstream_is_a_read_timeout(settings: Settings) -> None:
    async def run() -> None:
        streamer = UpstreamStreamer(settings, max_connections=2)
        try:
            async with streamer.stream(body(f"[[sim:ttft=3]] {uuid.uuid4().hex}"),
                                       httpx.Timeout(5.0, read=0.3)) as chunks:
                async for _chunk in chunks:
                    pass
        finally:
            await streamer.aclose()

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(run())


def test_nothing_listening_is_a_connect_error() -> None:
    async def run() -> None:
        pool = ConnectionPool("http://127.0.0.1:9/v1/chat/completions", max_idle=1)
        await pool.post(b"{}", {}, 2.0, 2.0)

    with pytest.raises(httpx.ConnectError):
        asyncio.run(run())


def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    """A server that closes each connection after one response without saying so: the next
    request finds its pooled connection dead and goes out again on a new one."""
    sse = b"data: {\"choices\": [{\"delta\": {\"content\": \"hi\"}, \"finish_reason\": \"stop\"}]}\n\n"
    response = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-length: " + str(len(sse)).encode() + b"\r\n\r\n" + sse)
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    async def run() -> list[list[bytes]]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}/v1/chat/completions", max_idle=2)
        got = []
        for _ in range(3):
            res = await pool.post(b"{}", {}, 2.0, 2.0)
            got.append([line async for line in res.lines() if line])
            res.close()
            await asyncio.sleep(0.05)  # let the server's close reach the pooled connection
        server.close()
        pool.close()
        return got

    got = asyncio.run(run())
    assert got == [[sse.strip()]] * 3
    assert connections == 3


def test_a_configured_proxy_switches_to_httpx(make_settings: Callable[..., Settings],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    streamer = UpstreamStreamer(make_settings(upstream_base_url="https://api.example.com/v1"), 2)
    assert streamer.pool is None and streamer.http is not None
    asyncio.run(streamer.aclose())
    direct = UpstreamStreamer(make_settings(upstream_base_url="http://127.0.0.1:1/v1"), 2)
    assert direct.pool is not None
    asyncio.run(direct.aclose())
