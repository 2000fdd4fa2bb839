"""Redis behind Sentinel: where the master is now, and redis-py's and kombu's Sentinel clients.

Every user of Redis gets its client or its address from `core.redis_io` (`redis_target`,
`sync_client`, `async_client`, the raw pipes, Celery's broker), which asks this module where the
master is behind Sentinel, so a Sentinel deployment is one URL everywhere:

``redis://[user:password@]host:6379/0``
    one Redis (``rediss://`` for TLS, ``unix:///path?db=0`` for a socket), as redis-py reads it.
``sentinel://[user:password@]s1:26379,s2:26379,s3:26379/mymaster/0``
    Redis behind Sentinel: the sentinels (comma-separated), the master's name, the db. The
    userinfo authenticates to the master; ``?sentinel_password=...`` (and
    ``sentinel_username``) to the sentinels themselves when they require it.
``sentinels://...``
    the same over TLS, to the sentinels and to the master; the ``ssl_*`` options of a
    ``rediss://`` URL (``ssl_cert_reqs``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
    ``ssl_check_hostname``) go in the query string.

With Sentinel, redis-py's clients ask the sentinels for the master on every (re)connect and
drop a connection that meets a ``READONLY`` reply (the master was demoted); the raw paths do the
same through `master_address` and `is_demoted`. Celery gets kombu's ``sentinel://`` transport
with ``master_name`` (`celery_broker`).
"""

from __future__ import annotations

import asyncio
import random
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel

from hybrid_router.settings.redis_url import SENTINEL_TIMEOUT_S, SentinelTarget


def sentinel_sync_client(target: SentinelTarget, redis_class: type[redis.Redis] = redis.Redis,
                         **kwargs: Any) -> redis.Redis:
    """A redis-py client of the (current) master; `kwargs` as for a connection pool."""
    manager = sync_sentinel.Sentinel(list(target.sentinels),
                                     sentinel_kwargs=target.sentinel_kwargs())
    client: redis.Redis = manager.master_for(target.service, redis_class=redis_class,
                                             **target.master_kwargs(), **kwargs)
    return client


def sentinel_async_client(target: SentinelTarget, **kwargs: Any) -> aioredis.Redis:
    """`sentinel_sync_client` for asyncio (redis-py's Sentinel pool does not block, so a
    blocking pool's callers get room for bursts instead)."""
    kwargs.pop("timeout", None)
    if "max_connections" in kwargs:
        kwargs["max_connections"] = max(int(kwargs["max_connections"]), 1024)
    manager = async_sentinel.Sentinel(list(target.sentinels),
                                      sentinel_kwargs=target.sentinel_kwargs())
    client: aioredis.Redis = manager.master_for(target.service, redis_class=aioredis.Redis,
                                                **target.master_kwargs(), **kwargs)
    return client


def master_address_sync(target: SentinelTarget) -> tuple[str, int]:
    """The master's address, asked of the sentinels (blocking)."""
    manager = sync_sentinel.Sentinel(list(target.sentinels),
                                     sentinel_kwargs=target.sentinel_kwargs())
    try:
        host, port = manager.discover_master(target.service)
    except sync_sentinel.MasterNotFoundError as exc:
        raise redis.ConnectionError(str(exc)) from exc
    return str(host), int(port)


async def _ask_sentinel(host: str, port: int, target: SentinelTarget) -> tuple[str, int] | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        parser = hiredis.Reader()
        commands: list[tuple[Any, ...]] = []
        if "password" in target.sentinel_auth:
            user = target.sentinel_auth.get("username")
            commands.append(("AUTH", user, target.sentinel_auth["password"]) if user
                            else ("AUTH", target.sentinel_auth["password"]))
        commands.append(("SENTINEL", "get-master-addr-by-name", target.service))
        writer.write(b"".join(hiredis.pack_command(c) for c in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = parser.gets()
            if reply is False:
                data = await reader.read(4096)
                if not data:
                    raise EOFError("sentinel closed the connection")
                parser.feed(data)
                continue
            replies.append(reply)
        answer = replies[-1]
        if isinstance(answer, list) and len(answer) == 2:
            return answer[0].decode(), int(answer[1])
        return None
    finally:
        writer.close()


async def master_address(target: SentinelTarget) -> tuple[str, int]:
    """The master's address as the first sentinel that answers knows it (sentinels tried in a
    random order, so a dead one does not delay every reconnect). `redis.ConnectionError` when
    none answers."""
    errors: list[str] = []
    for host, port in random.sample(target.sentinels, len(target.sentinels)):
        try:
            found = await asyncio.wait_for(_ask_sentinel(host, port, target), SENTINEL_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError) as exc:
            errors.append(f"{host}:{port}: {exc or type(exc).__name__}")
            continue
        if found is not None:
            return found
        errors.append(f"{host}:{port}: does not know {target.service!r}")
    raise redis.ConnectionError(f"no sentinel named the master {target.service!r}: "
                                + "; ".join(errors))


def is_demoted(reply: Any) -> bool:
    """Whether a reply says the connection reached a replica (a master demoted by a failover):
    the raw paths then drop the connection and ask the sentinels again."""
    return isinstance(reply, hiredis.ReplyError) and "READONLY" in str(reply)[:64]


def celery_broker(target: SentinelTarget) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """Celery's broker URL behind Sentinel (kombu's ``sentinel://`` transport), the transport
    options it needs (the master's name, the sentinels' own login) and its ``broker_use_ssl``."""
    userinfo = ""
    if target.password is not None:
        userinfo = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    broker = ";".join(f"sentinel://{userinfo}{_netloc_host(h)}:{p}/{target.db}"
                      for h, p in target.sentinels)
    options: dict[str, Any] = {"master_name": target.service,
                               "sentinel_kwargs": target.sentinel_kwargs()}
    return broker, options, (dict(target.ssl_options) or {"ssl_cert_reqs": "required"}
                             if target.ssl else None)


def _netloc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def safe_url(url: str) -> str:
    """A URL with any password replaced (the userinfo's, a Sentinel URL's query's), for
    banners and logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}")
    if "password" in parts.query:
        query = "&".join(f"{k}=***" if "password" in k else f"{k}={v}"
                         for k, v in parse_qsl(parts.query))
        parts = parts._replace(query=query)
    return parts.geturl()
