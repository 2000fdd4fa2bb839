"""The one way to reach Redis: every connection of the router is opened from its URL here.

`redis_target` reads a Redis URL (``redis://``, ``rediss://`` with TLS, ``unix://``, and behind
Sentinel ``sentinel://`` / ``sentinels://``, `core.redis_sentinel`) into a `RedisTarget`, and
everything else is built from that: redis-py clients (`sync_client`, `async_client`), the
Celery broker's options (`RedisTarget.broker`), and the raw connections of the hot paths
(`RedisPipe`, `PipePool`, `SyncPipe`, `open_transport` for the event hub). Behind
Sentinel every (re)connect asks the sentinels for the master, and a ``READONLY`` reply (a
failover demoted it) drops the raw connection, so the next batch reaches the new master.

Why raw connections beside redis-py: the stream publisher sends a batch of scripts on every turn
of the stream engine's loop and the API's followers read one batch per token, thousands of
commands a second; redis-py spends most of a command's CPU around the socket (pool checkout, a
timeout context per read, per-command response callbacks). Here hiredis packs the commands and
parses the replies, and a batch is one write and as many reads as its replies need. Error
replies become the exceptions redis-py raises (`reply_error`), so callers catch one set.

TLS options ride on the URL's query, with redis-py's names: ``ssl_ca_certs``, ``ssl_certfile``,
``ssl_keyfile``, ``ssl_cert_reqs`` (``required`` | ``optional`` | ``none``) and
``ssl_check_hostname``; the database on ``unix://`` URLs is ``?db=N``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.connection as aioconnection
import redis.connection as syncconnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from hybrid_router.router.core.redis_sentinel import (
    celery_broker,
    is_demoted,
    master_address,
    master_address_sync,
    sentinel_async_client,
    sentinel_sync_client,
)
from hybrid_router.router.core.redis_sentinel import safe_url as safe_url  # for logs, banners
from hybrid_router.settings.redis_url import SentinelTarget, is_sentinel, parse_sentinel

READ_SIZE = 65536
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
P = TypeVar("P", bound=asyncio.BaseProtocol)


@dataclass(frozen=True)
class TLS:
    """How to check the server's certificate (and which one to show it)."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    @cached_property
    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_certs)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        context.check_hostname = self.check_hostname and self.cert_reqs != "none"
        context.verify_mode = _CERT_REQS[self.cert_reqs]
        return context

    def options(self) -> dict[str, Any]:
        """redis-py's (and kombu's) names for these options."""
        return {"ssl_ca_certs": self.ca_certs, "ssl_certfile": self.certfile,
                "ssl_keyfile": self.keyfile, "ssl_cert_reqs": _CERT_REQS[self.cert_reqs],
                "ssl_check_hostname": self.check_hostname and self.cert_reqs != "none"}


@dataclass(frozen=True)
class RedisTarget:
    """Where a Redis server is and how to log in: TCP (`host`, `port`, maybe `tls`) or a unix
    socket (`path`)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLS | None = None
    # Behind Sentinel: where to ask for the master (`host` and `port` are then asked on every
    # connect, `core.redis_sentinel`).
    sentinel: SentinelTarget | None = None

    def setup_commands(self, select: bool = True) -> list[tuple[Any, ...]]:
        """What a raw connection sends first: AUTH, then SELECT unless `select` is off; behind
        Sentinel also ROLE (a sentinel that has not seen a failover yet may name a replica)."""
        setup: list[tuple[Any, ...]] = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username
                         else ("AUTH", self.password))
        if select and self.db:
            setup.append(("SELECT", self.db))
        if self.sentinel is not None:
            setup.append(("ROLE",))
        return setup

    async def resolved(self) -> RedisTarget:
        """This target with the master's current address (asked of the sentinels)."""
        if self.sentinel is None:
            return self
        host, port = await master_address(self.sentinel)
        return replace(self, host=host, port=port)

    def resolved_sync(self) -> RedisTarget:
        """`resolved`, blocking."""
        if self.sentinel is None:
            return self
        host, port = master_address_sync(self.sentinel)
        return replace(self, host=host, port=port)

    def pool_options(self, asynchronous: bool) -> dict[str, Any]:
        """A redis-py connection pool's connection class and its arguments."""
        module = aioconnection if asynchronous else syncconnection
        options: dict[str, Any] = {"db": self.db, "username": self.username,
                                   "password": self.password}
        if self.path is not None:
            return {**options, "connection_class": module.UnixDomainSocketConnection,
                    "path": self.path}
        options.update(host=self.host, port=self.port)
        if self.tls is not None:
            return {**options, **self.tls.options(), "connection_class": module.SSLConnection}
        return {**options, "connection_class": module.Connection}

    def broker(self) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """The Celery broker URL in kombu's spelling, the transport options it needs (behind
        Sentinel: the master's name) and its TLS options (None: plain)."""
        if self.sentinel is not None:
            return celery_broker(self.sentinel)
        login = (f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
                 if self.password is not None else "")
        if self.path is not None:
            return f"redis+socket://{login}{self.path}?virtual_host={self.db}", {}, None
        scheme = "rediss" if self.tls is not None else "redis"
        url = f"{scheme}://{login}{self.host}:{self.port}/{self.db}"
        return url, {}, None if self.tls is None else self.tls.options()


def redis_target(url: str) -> RedisTarget:
    """The server a ``redis://``, ``rediss://``, ``unix://``, ``sentinel://`` or
    ``sentinels://`` URL names (see the module doc)."""
    if is_sentinel(url):
        return _sentinel_target(parse_sentinel(url))
    parts = urlsplit(url)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    unknown = sorted(set(query) - {"db", *TLS_OPTIONS})
    if unknown:
        raise ValueError(f"unsupported Redis URL option(s) {', '.join(unknown)}: this router reads "
                         f"db and {', '.join(TLS_OPTIONS)}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        return RedisTarget(path=unquote(parts.path), db=int(query.get("db", 0)),
                           username=username, password=password)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {parts.scheme}://")
    tls = None
    if parts.scheme == "rediss":
        reqs = query.get("ssl_cert_reqs", "required").lower()
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {reqs}")
        tls = TLS(query.get("ssl_ca_certs"), query.get("ssl_certfile"), query.get("ssl_keyfile"),
                  reqs, query.get("ssl_check_hostname", "true").lower() not in ("false", "0", "no"))
    db = parts.path.lstrip("/") or query.get("db", "0")
    return RedisTarget(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                       db=int(db), tls=tls, username=username, password=password)


def _sentinel_target(sentinel: SentinelTarget) -> RedisTarget:
    tls = None
    if sentinel.ssl:
        options = sentinel.ssl_options
        tls = TLS(options.get("ssl_ca_certs"), options.get("ssl_certfile"),
                  options.get("ssl_keyfile"), str(options.get("ssl_cert_reqs", "required")),
                  bool(options.get("ssl_check_hostname", True)))
    return RedisTarget(host="", port=0, db=sentinel.db, username=sentinel.username,
                       password=sentinel.password, tls=tls, sentinel=sentinel)


class SyncClient(redis.Redis):
    """redis-py's client, knowing its `url` (to open a `SyncPipe` to the same server)."""

    url: str = ""


def sync_client(url: str, blocking: bool = False, **options: Any) -> SyncClient:
    """A redis-py client for `url` (`options`: pool and connection arguments such as
    ``socket_timeout`` or ``max_connections``; `blocking`: wait for a free connection)."""
    target = redis_target(url)
    if target.sentinel is not None:
        client = cast(SyncClient, sentinel_sync_client(target.sentinel, redis_class=SyncClient,
                                                       **options))
    else:
        pool_class = redis.BlockingConnectionPool if blocking else redis.ConnectionPool
        pool = pool_class(**target.pool_options(asynchronous=False), **options)
        client = SyncClient(connection_pool=pool)
        client.auto_close_connection_pool = True  # as `Redis.from_pool`: closing it closes it
    client.url = url
    return client


def async_client(url: str, blocking: bool = False, **options: Any) -> aioredis.Redis:
    """`sync_client` for asyncio."""
    target = redis_target(url)
    if target.sentinel is not None:
        return sentinel_async_client(target.sentinel, **options)
    pool_class = aioredis.BlockingConnectionPool if blocking else aioredis.ConnectionPool
    pool = pool_class(**target.pool_options(asynchronous=True), **options)
    return aioredis.Redis.from_pool(pool)


async def open_transport(target: RedisTarget, factory: Callable[[], P]
                         ) -> tuple[asyncio.Transport, P]:
    """A raw connection to `target` driven by the protocol `factory` makes (TLS, unix or TCP;
    behind Sentinel, to the master the sentinels name now)."""
    loop = asyncio.get_running_loop()
    target = await target.resolved()
    if target.path is not None:
        transport, protocol = await loop.create_unix_connection(factory, target.path)
    else:
        context = None if target.tls is None else target.tls.context
        transport, protocol = await loop.create_connection(
            factory, target.host, target.port, ssl=context,
            server_hostname=None if context is None else target.host)
    return transport, protocol


_ERRORS: dict[str, type[redis.RedisError]] = {
    "NOSCRIPT": redis.exceptions.NoScriptError, "READONLY": redis.exceptions.ReadOnlyError,
    "LOADING": redis.exceptions.BusyLoadingError, "NOPERM": redis.exceptions.NoPermissionError,
    "NOAUTH": redis.AuthenticationError, "WRONGPASS": redis.AuthenticationError,
    "EXECABORT": redis.exceptions.ExecAbortError, "OOM": redis.exceptions.OutOfMemoryError,
}


def reply_error(reply: hiredis.ReplyError) -> redis.RedisError:
    """The exception redis-py raises for this error reply (`NoScriptError`, `ReadOnlyError`,
    `ResponseError`, ...), so callers catch the same classes whichever client ran the command."""
    text = str(reply)
    code, _, message = text.partition(" ")
    error = _ERRORS.get(code)
    return error(message) if error is not None else redis.ResponseError(text)


def raise_errors(replies: list[Any]) -> list[Any]:
    """`replies`, or the first error reply raised as redis-py's exception."""
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise reply_error(reply)
    return replies


def check_setup_reply(reply: Any) -> None:
    """A refused AUTH or SELECT, or (ROLE, behind Sentinel) a server that is not the master."""
    if isinstance(reply, hiredis.ReplyError):
        raise redis.AuthenticationError(str(reply))
    if isinstance(reply, list) and reply and reply[0] != b"master":
        raise redis.ConnectionError(f"Redis is a {reply[0]!r}, not the master")


def _check_setup(replies: list[Any]) -> None:
    for reply in replies:
        check_setup_reply(reply)


@dataclass(frozen=True)
class LuaScript:
    """A Lua script, run by SHA (``EVALSHA``) and loaded when Redis does not know it.

    Not redis-py's `Script`: that one belongs to a client and, in a pipeline, first asks Redis
    whether its scripts exist (a round trip more per pipeline). One instance here serves every
    client: `__call__` on a redis-py client (or pipeline-free sync code), `run_scripts` for a
    batch over raw connections."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    def __call__(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


ScriptCall = tuple[LuaScript, list[str], list[Any]]


class Executor(Protocol):
    """A `RedisPipe` or a `PipePool`."""

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]: ...


async def run_scripts(executor: Executor, calls: list[ScriptCall],
                      then: tuple[Any, ...] | None = None) -> list[Any]:
    """Run `calls` in one round trip on a raw connection; each result in place, an error as
    the exception redis-py would raise (as ``raise_on_error=False``). A call whose script Redis
    does not know (a restart emptied its cache) did not run: its script is loaded and it runs
    again. `then` (a ``WAIT``) is sent after the calls on the same connection, its reply last.
    Raises `redis.ConnectionError` / `redis.TimeoutError` when Redis cannot be reached."""
    tail = [then] if then is not None else []
    results = await executor.execute(
        [("EVALSHA", s.sha, len(k), *k, *a) for s, k, a in calls] + tail)
    failed = [i for i, r in enumerate(results[:len(calls)]) if isinstance(r, hiredis.ReplyError)]
    if not failed:  # the usual case: the replies as they are
        return results
    unknown = [i for i in failed if str(results[i]).startswith("NOSCRIPT")]
    if unknown:
        scripts = {calls[i][0].sha: calls[i][0] for i in unknown}
        again = await executor.execute(
            [("SCRIPT", "LOAD", s.source) for s in scripts.values()]
            + [("EVALSHA", calls[i][0].sha, len(calls[i][1]), *calls[i][1], *calls[i][2])
               for i in unknown] + tail)
        for i, result in zip(unknown, again[len(scripts):len(scripts) + len(unknown)],
                             strict=True):
            results[i] = result
        if then is not None:
            results[-1] = again[-1]
    for i in failed:
        if isinstance(results[i], hiredis.ReplyError):
            results[i] = reply_error(results[i])
    return results


class RedisPipe:
    """Pipelined commands over one raw connection; replies in order, errors as `ReplyError`s.

    One batch at a time; a connection error closes the connection and the next batch opens a
    new one."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.target = redis_target(url)
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()

    async def execute(self, commands: list[tuple[Any, ...]], timeout_s: float | None = None
                      ) -> list[Any]:
        """Send `commands` in one write; their replies (a `hiredis.ReplyError` for an error).
        Raises `redis.ConnectionError` (or `redis.TimeoutError`) when the connection fails."""
        timeout_s = timeout_s or self.timeout_s
        # A plain timer that closes the connection when it fires (the pending read then ends):
        # cheaper than an asyncio.timeout() scope per batch.
        expired: list[bool] = []
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, expired)
        try:
            if self._writer is None:
                await asyncio.wait_for(self._connect(), timeout_s)
            replies = await self._roundtrip(commands)
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
        if self.target.sentinel is not None and any(is_demoted(r) for r in replies):
            self.close()  # a failover demoted this master: the next batch asks the sentinels
            raise redis.ConnectionError("Redis answered READONLY: the master was demoted")
        return replies

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
        reader = asyncio.StreamReader()
        transport, protocol = await open_transport(
            self.target, lambda: asyncio.StreamReaderProtocol(reader))
        self._reader = reader
        self._writer = asyncio.StreamWriter(transport, protocol, reader,
                                            asyncio.get_running_loop())
        setup = self.target.setup_commands()
        if setup:
            _check_setup(await self._roundtrip(setup))

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


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
        result: list[Any] = await self.retry.call_with_retry(
            lambda: self._execute(commands, timeout_s), _no_cleanup)
        return result

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


class SyncPipe:
    """A blocking raw connection for a long run of commands whose replies are read while later
    commands are still being built (`hybrid_router.workers.batch.lua.run_overlapped`)."""

    def __init__(self, url: str, timeout_s: float | None = None) -> None:
        target = redis_target(url).resolved_sync()
        try:
            if target.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout_s)
                sock.connect(target.path)
            else:
                sock = socket.create_connection((target.host, target.port), timeout_s)
                if target.tls is not None:
                    sock = target.tls.context.wrap_socket(sock, server_hostname=target.host)
        except OSError as exc:
            raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc
        self._sock = sock
        self._parser = hiredis.Reader()
        setup = target.setup_commands()
        self.send(setup)
        _check_setup([self.read() for _ in setup])

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        try:
            self._sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
        except OSError as exc:
            raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc

    def read(self) -> Any:
        """The next reply (a `hiredis.ReplyError` for an error)."""
        while True:
            reply = self._parser.gets()
            if reply is not False:
                return reply
            try:
                data = self._sock.recv(READ_SIZE)
            except TimeoutError as exc:
                raise redis.TimeoutError("no reply from Redis in time") from exc
            except OSError as exc:
                raise redis.ConnectionError(f"Redis connection failed: {exc}") from exc
            if not data:
                raise redis.ConnectionError("Redis closed the connection")
            self._parser.feed(data)

    def close(self) -> None:
        self._sock.close()
