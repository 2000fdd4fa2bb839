"""A lean HTTP/1.1 client for the stream lane's one kind of request: POST, then read SSE lines.

Why not httpx here: a stream worker relays thousands of chunks a second on one event loop, and
httpx spends several times this client's CPU to send a request and to pass each chunk through
httpcore and anyio. This client is an `asyncio.Protocol` around httptools' C parser (installed
with uvicorn[standard]): it writes the request in one call, the parser decodes the chunked body,
and complete lines are handed to the reader as they arrive. Keep-alive connections are pooled
per origin; TLS uses the certifi bundle like httpx. It does only what the upstream call needs:
no redirects, no compression (``Accept-Encoding: identity``), no proxies — when a proxy is
configured in the environment, `hybrid_router.workers.upstream.sse` uses httpx instead.

Errors are httpx's exception classes (`httpx.ConnectError`, `httpx.ReadTimeout`,
`httpx.RemoteProtocolError`, ...), so callers classify them exactly as for httpx.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

# Stop reading from the socket while this many lines wait for the reader.
MAX_BUFFERED_LINES = 4096


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {url!r}")
        return cls(scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Connection(asyncio.Protocol):
    """One keep-alive connection; one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        """Ready for the next response (a new parser: one response per connection at a time)."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.body = bytearray()
        self.lines: collections.deque[bytes] = collections.deque()
        self._partial = b""
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.aborted = False

    # --- protocol callbacks --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response from the upstream: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.complete:
            self._fail(httpx.RemoteProtocolError(
                "the upstream closed the connection before the response ended"
                + (f": {exc}" if exc else "")))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.status >= 400:
            self.body += body
            return
        data = self._partial + body
        if b"\n" not in body:
            self._partial = data
            return
        *lines, self._partial = data.split(b"\n")
        self.lines.extend(lines)
        if len(self.lines) > MAX_BUFFERED_LINES and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._partial:
            self.lines.append(self._partial)
            self._partial = b""
        # Asked here: once the callback returned, the parser no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # --- the reader ---------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.aborted:  # closed on purpose: the reader just sees the body end
            return
        if self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float, what: str) -> None:
        """Wait for the next callback (headers, lines, end or error), at most `timeout`."""
        if self.error is not None:
            raise self.error
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise httpx.ReadTimeout(f"no {what} from the upstream within {timeout:g}s") from None
        finally:
            timer.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop this response now: the reader sees its body end (no error); the connection
        is closed, so the upstream sees the client go away and stops generating."""
        self.aborted = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def take_lines(self) -> list[bytes]:
        lines = list(self.lines)
        self.lines.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return lines

    @property
    def reusable(self) -> bool:
        return (self.complete and self.error is None and self.transport is not None
                and not self.transport.is_closing() and self.keep_alive)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Response:
    """One streamed response: status and headers, then `lines()` until the body ends."""

    def __init__(self, pool: ConnectionPool, conn: Connection, read_timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self.status_code = conn.status
        self.headers = httpx.Headers([(k.decode("latin-1"), v.decode("latin-1"))
                                      for k, v in conn.headers])

    async def read(self) -> bytes:
        """The whole body (for error answers)."""
        while not self._conn.complete:
            await self._conn.wait(self._read_timeout, "response body")
        return bytes(self._conn.body)

    async def lines(self) -> Any:
        """Body lines as they arrive (without the line end), until the body ends."""
        conn = self._conn
        while not conn.aborted:
            if conn.lines:
                for line in conn.take_lines():
                    yield line.rstrip(b"\r")
                continue
            if conn.complete:
                return
            await conn.wait(self._read_timeout, "data")

    @property
    def aborted(self) -> bool:
        return self._conn.aborted

    def abort(self) -> None:
        """End the body now and close the connection (see `Connection.abort`)."""
        self._conn.abort()

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        self._pool.release(self._conn)


class ConnectionPool:
    """Keep-alive connections to one origin."""

    def __init__(self, url: str, max_idle: int) -> None:
        self.origin = Origin.of(url)
        self.path = urlsplit(url).path or "/"
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._ssl: ssl.SSLContext | None = None
        if self.origin.scheme == "https":
            import certifi

            self._ssl = ssl.create_default_context(cafile=certifi.where())

    async def post(self, body: bytes, headers: dict[str, str], connect_timeout: float,
                   read_timeout: float) -> Response:
        """Send the request; returns once the status line and headers arrived."""
        head = self._head(len(body), headers)
        for _attempt in range(2):
            conn = await self._connection(connect_timeout)
            assert conn.transport is not None
            conn.transport.write(head + body)
            try:
                while not conn.headers_done:
                    await conn.wait(read_timeout, "response")
            except httpx.RemoteProtocolError:
                conn_was_reused = conn.reused
                self.release(conn)
                # A kept-alive connection the server had already closed: send it again, once.
                if conn_was_reused and conn.status == 0:
                    continue
                raise
            return Response(self, conn, read_timeout)
        raise httpx.RemoteProtocolError("the upstream closed the connection")  # pragma: no cover

    def _head(self, length: int, headers: dict[str, str]) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.origin.host_header}",
                 f"Content-Length: {length}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connection(self, timeout: float) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                conn._reset()
                return conn
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(loop), self.origin.host, self.origin.port,
                                       ssl=self._ssl,
                                       server_hostname=self.origin.host if self._ssl else None),
                timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {self.origin.host_header} took longer than "
                                       f"{timeout:g}s") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.origin.host_header}: {exc}") from exc
        return conn

    def release(self, conn: Connection) -> None:
        if conn.reusable and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
