"""The stream lane's upstream call: one streamed chat completion (or Responses stream), read as
raw SSE, on asyncio; and the lane's one plain call (embeddings).

Why not ``AsyncOpenAI.chat.completions.create(stream=True)`` on the hot path: a stream worker
starts hundreds of streams a second and relays thousands of chunks a second on one event loop,
and the SDK builds each request and a pydantic model per chunk at a CPU cost that would bound
the streams per worker (raw httpx: about half of it, a dict per chunk). So the request is sent by the lean client of
`hybrid_router.workers.upstream.http` (httpx when a proxy is configured), but configured *from the SDK
client* (`hybrid_router.workers.upstream.base.make_async_openai_client`): the same base URL, auth and headers the
SDK would send, and HTTP errors become the SDK's own exception classes
(`openai.RateLimitError`, `openai.InternalServerError`, ...), so retry decisions
(`hybrid_router.workers.retry`) are the same as for any other SDK call.

The body is read to its end even after ``data: [DONE]``, so the keep-alive connection goes back
to the pool (no new TCP/TLS handshake before the next stream's first token).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import openai
import orjson

from hybrid_router.settings import Settings
from hybrid_router.workers.stream.abort import current_abort
from hybrid_router.workers.upstream.base import make_async_openai_client
from hybrid_router.workers.upstream.http import ConnectionPool

try:  # the SDK's own transport (newer SDKs use the httpx2 fork, older ones httpx itself)
    import httpx2

    _HTTPX2_ERRORS: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    _HTTPX2_TIMEOUTS: tuple[type[BaseException], ...] = (httpx2.TimeoutException,)
except ImportError:  # pragma: no cover - depends on the installed SDK
    _HTTPX2_ERRORS = ()
    _HTTPX2_TIMEOUTS = ()

# A transport failure while connecting or reading the body: the stream was cut short.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    *_HTTPX2_ERRORS,
    openai.APIConnectionError,
    ConnectionError,
)

# The subset of those that are timeouts (idle timeout between chunks, connect timeout).
TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    *_HTTPX2_TIMEOUTS,
    openai.APITimeoutError,
)

CHAT_PATH = "/chat/completions"

_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


class UpstreamStreamError(openai.APIError):
    """An ``{"error": ...}`` object sent inside the stream by the upstream."""


def status_error(response: httpx.Response, body: bytes) -> openai.APIStatusError:
    """The SDK's exception for an HTTP error answer (what ``AsyncOpenAI`` would raise)."""
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = body.decode(errors="replace")
    inner = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    message = inner.get("message") if isinstance(inner, dict) else inner
    text = f"Error code: {response.status_code} - {message or parsed or response.reason_phrase}"
    code = response.status_code
    cls = _STATUS_ERRORS.get(code) or (openai.InternalServerError if code >= 500 else openai.APIStatusError)
    return cls(text, response=cast(Any, response), body=inner)


class UpstreamStreamer:
    """Sends streamed chat completions to the upstream over a keep-alive connection pool:
    `hybrid_router.workers.upstream.http` (lean, httptools) unless the environment sets a proxy for the
    upstream, then httpx (which honours the proxy variables)."""

    def __init__(self, settings: Settings, max_connections: int) -> None:
        sdk = make_async_openai_client(settings)
        headers = {k: v for k, v in {**sdk.default_headers, **sdk.auth_headers}.items()
                   if isinstance(v, str)}
        headers["Accept"] = "text/event-stream"
        self.base_url = str(sdk.base_url).rstrip("/")
        self.url = self.base_url + CHAT_PATH
        self.headers = headers
        self._request = httpx.Request("POST", self.url)  # for the SDK's exceptions
        self.pool: ConnectionPool | None = None
        self._pools: dict[str, ConnectionPool] = {}  # other paths than chat's (responses)
        self._max_connections = max_connections
        self._timeout_s = settings.upstream_timeout_s
        self.http: httpx.AsyncClient | None = None
        self._plain: httpx.AsyncClient | None = None  # plain (not streamed) calls: embeddings
        if _proxied(self.url):
            self.http = self._httpx_client()
        else:
            self.pool = ConnectionPool(self.url, max_idle=max_connections)

    def _httpx_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            headers=self.headers, timeout=self._timeout_s,
            limits=httpx.Limits(max_connections=self._max_connections,
                                max_keepalive_connections=self._max_connections))

    def _pool_for(self, path: str) -> ConnectionPool | None:
        if self.pool is None or path == CHAT_PATH:
            return self.pool
        pool = self._pools.get(path)
        if pool is None:
            pool = self._pools[path] = ConnectionPool(self.base_url + path,
                                                      max_idle=self._max_connections)
        return pool

    async def call(self, body: dict[str, Any], timeout: httpx.Timeout, path: str
                   ) -> dict[str, Any]:
        """POST `body` to `path` (under the base URL) and return the JSON answer: a plain,
        not streamed call (embeddings). HTTP errors raise as in `stream`."""
        if self._plain is None:
            self._plain = self._httpx_client()
        response = await self._plain.post(self.base_url + path, content=orjson.dumps(body),
                                          headers={"Accept": "application/json",
                                                   "Content-Type": "application/json"},
                                          timeout=timeout)
        if response.status_code >= 400:
            raise status_error(response, response.content)
        answer: dict[str, Any] = orjson.loads(response.content)
        return answer

    @asynccontextmanager
    async def stream(self, body: dict[str, Any], timeout: httpx.Timeout, path: str = CHAT_PATH
                     ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """POST `body` with ``stream: true`` to `path` (chat completions, or responses); yields
        the chunks' iterator (HTTP errors raise the SDK's `openai.APIStatusError` subclasses
        before anything is yielded).

        Inside a `hybrid_router.workers.stream.abort.UpstreamAbort` scope the response is bound to it: firing
        it closes the connection and ends the chunks with one empty chunk (the lean client;
        through a proxy, httpx, the stream stops at its next chunk instead)."""
        content = orjson.dumps(body)
        pool = self._pool_for(path)
        if pool is None:
            async with self._stream_httpx(content, timeout, path) as chunks:
                yield chunks
            return
        abort = current_abort()
        response = await pool.post(content, self.headers, timeout.connect or 60.0,
                                   timeout.read or 60.0)
        try:
            if response.status_code >= 400:
                error_body = await response.read()
                raise status_error(httpx.Response(response.status_code, headers=response.headers,
                                                  content=error_body, request=self._request),
                                   error_body)
            if abort is not None:
                abort.bind(response.abort)
            yield sse_chunks(response.lines(), self._request, lambda: response.aborted)
        finally:
            if abort is not None:
                abort.unbind()
            response.close()

    @asynccontextmanager
    async def _stream_httpx(self, content: bytes, timeout: httpx.Timeout, path: str
                            ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        assert self.http is not None
        request = self.http.build_request("POST", self.base_url + path, content=content,
                                          timeout=timeout, headers=self.headers)
        response = await self.http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                raise status_error(response, await response.aread())
            yield sse_chunks(_httpx_lines(response), response.request)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        for pool in (self.pool, *self._pools.values()):
            if pool is not None:
                pool.close()
        for client in (self.http, self._plain):
            if client is not None:
                await client.aclose()


def _proxied(url: str) -> bool:
    """Whether the environment routes `url` through a proxy (HTTPS_PROXY, NO_PROXY, ...)."""
    from urllib.request import getproxies, proxy_bypass

    scheme = urlsplit(url).scheme
    proxies = getproxies()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not proxy_bypass(urlsplit(url).hostname or "")


async def _httpx_lines(response: httpx.Response) -> AsyncIterator[bytes]:
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        if b"\n" not in data:
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if buffer:
        yield buffer


async def sse_chunks(lines: AsyncIterator[bytes], request: httpx.Request,
                     aborted: Callable[[], bool] | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an SSE chat-completion stream; reads the body to its end.

    A body ended by an abort (`aborted()` true at its end) ends with one empty chunk: the
    reader looks at its stop flag after every chunk, so it stops there instead of taking the
    end for a dropped connection."""
    done = False
    async for line in lines:
        if done or not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True  # keep reading: the rest of the body lets the connection be reused
            continue
        chunk = orjson.loads(payload)
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamStreamError(str(message or "error inside the stream"),
                                      cast(Any, request), body=error)
        yield chunk
    if aborted is not None and aborted():
        yield {}
