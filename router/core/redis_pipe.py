"""A minimal asyncio Redis connection for the two per-token hot paths: the stream engine's
token publisher and the API's SSE followers (``XREAD BLOCK`` on a request's replay log).

Why not redis-py there: the publisher sends a batch of EMIT scripts on every turn of the stream
engine's loop, and each SSE follower issues one XREAD per token it relays, thousands of commands
a second either way, and redis-py spends most of a command's CPU around the socket (pool
checkout, a timeout context per read, per-command response callbacks). Here hiredis packs the
commands and parses the replies, and a batch is one write and as many reads as the replies
need. One batch at a time per connection; a connection error closes the connection and the
next batch opens a new one.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis
from redis._parsers.base import BaseParser
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import parse_url

READ_SIZE = 65536


class RedisPipe:
    """Pipelined commands over one connection; replies in order, errors as `ReplyError`s."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        if not self.supports(url):
            raise ValueError(f"RedisPipe supports plain redis:// URLs, not {urlsplit(url).scheme}://")
        options = parse_url(url)
        self.host = str(options.get("host") or "localhost")
        self.port = int(options.get("port") or 6379)
        self.db = int(options.get("db") or 0)
        self.username = options.get("username")
        self.password = options.get("password")
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()

    @staticmethod
    def supports(url: str) -> bool:
        """Plain TCP only: TLS and unix sockets carry options (certificates, paths) that
        redis-py reads from the URL, so callers use redis-py for those."""
        return urlsplit(url).scheme == "redis"

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]:
        """Send `commands` in one write; their replies (a `hiredis.ReplyError` for an error).
        Raises `redis.ConnectionError` (or `redis.TimeoutError`) when the connection fails."""
        timeout_s = timeout_s or self.timeout_s
        # A plain timer that closes the connection when it fires (the pending read then ends):
        # cheaper than an asyncio.timeout() scope per batch, which showed up in profiles.
        expired: list[bool] = []
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, expired)
        try:
            if self._writer is None:
                await asyncio.wait_for(self._connect(), timeout_s)
            return await self._roundtrip(commands)
        except (OSError, EOFError, TimeoutError) as exc:
            self.close()
            if expired or isinstance(exc, TimeoutError):
                raise redis.TimeoutError(f"no reply from Redis within {timeout_s:g}s") from exc
            raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc
        except BaseException:  # cancelled mid-batch, refused AUTH: the stream is out of step
            self.close()
            raise
        finally:
            timer.cancel()

    def _expire(self, expired: list[bool]) -> None:
        expired.append(True)
        if self._writer is not None:
            self._writer.transport.abort()

    async def _roundtrip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        replies: list[Any] = []
        parser = self._parser
        while len(replies) < len(commands):
            reply = parser.gets()
            if reply is False:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise EOFError("Redis closed the connection")
                parser.feed(data)
                continue
            replies.append(reply)
        return replies

    async def _connect(self) -> None:
        self._parser = hiredis.Reader()
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username
                         else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        if setup:
            for reply in await self._roundtrip(setup):
                if isinstance(reply, hiredis.ReplyError):
                    raise redis.AuthenticationError(str(reply))

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def reply_error(reply: hiredis.ReplyError) -> redis.RedisError:
    """The exception redis-py raises for this error reply (`NoScriptError`, `ReadOnlyError`,
    `ResponseError`, ...), so callers catch the same classes whichever client ran the command."""
    error: redis.RedisError = BaseParser.parse_error(str(reply))
    return error


def client_retry() -> Retry:
    """redis-py 8's default retry of its clients (10 retries, 10 ms doubling with jitter up to
    1 s apart, on connection errors and timeouts): raw batches that stand in for a redis-py
    client's commands ride out a Redis restart exactly as those commands did."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), 10)


class PipePool:
    """Idle `RedisPipe` connections to one server: callers take one for a batch (or hold one
    for a while) and give it back; a broken pipe is dropped, not reused. With `retry`,
    `execute` retries a batch that met a connection error or a timeout, as redis-py does."""

    def __init__(self, url: str, max_idle: int = 256, retry: Retry | None = None) -> None:
        self.url = url
        self.max_idle = max_idle
        self.retry = retry
        self._idle: list[RedisPipe] = []

    def acquire(self) -> RedisPipe:
        return self._idle.pop() if self._idle else RedisPipe(self.url)

    def release(self, pipe: RedisPipe) -> None:
        if pipe.connected and len(self._idle) < self.max_idle:
            self._idle.append(pipe)
        else:
            pipe.close()

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]:
        """`RedisPipe.execute` on a pooled connection (retried per `retry`). A pooled
        connection found dead (Redis restarted since it was last used: nothing sent on it
        reached the new server) is replaced and the batch sent once more in any case."""
        if self.retry is None:
            return await self._execute(commands, timeout_s)
        return await self.retry.call_with_retry(lambda: self._execute(commands, timeout_s),
                                                _no_cleanup)

    async def _execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None
                       ) -> list[Any]:
        reused = bool(self._idle)
        pipe = self.acquire()
        try:
            return await pipe.execute(commands, timeout_s)
        except redis.ConnectionError:
            if not reused:
                raise
            pipe = RedisPipe(self.url)
            return await pipe.execute(commands, timeout_s)
        finally:
            self.release(pipe)

    def close(self) -> None:
        """Close the idle connections (those in use close when their holder releases them)."""
        idle, self._idle = self._idle, []
        for pipe in idle:
            pipe.close()


async def _no_cleanup(_error: Exception) -> None:
    """A failed pipe closes itself; nothing else to undo before a retry."""
