"""The Celery broker transport: kombu's Redis transport, with one guard against a kombu defect.

Why: with kombu 5.7 and redis-py 8, a worker whose broker connection drops while a task runs
(``acks_late``: its message is unacknowledged) closes the connection, and closing the channel
restores unacknowledged messages through a new client built from the connection's parameters,
which the close has already dropped. That raised ``AttributeError: 'NoneType' object has no
attribute 'hostname'``; Celery takes any error that is not a connection error as unrecoverable,
so the worker exited. Here a channel asked for a client once its connection is gone answers what
that means, a lost connection: a `redis.ConnectionError`, which kombu and Celery already handle
(the worker reconnects; the running task's message is restored after the visibility timeout if
its acknowledgement is lost, and every task of the router is idempotent).

The guard is on `Channel.conn_or_acquire`, the channel's public way to get a client.

Used for ``redis://``, ``rediss://`` and unix-socket broker URLs, and (kombu's Sentinel
channel, same guard) for ``sentinel://`` ones (`core.celery_app`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.transport import redis as kombu_redis


class _ClosedConnectionGuard:
    """Mixed into kombu's channels: asked for a client once the connection is gone, the
    channel answers what that means, a lost connection."""

    connection: Any

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is None and self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        with super().conn_or_acquire(client) as acquired:  # type: ignore[misc]
            yield acquired


class Channel(_ClosedConnectionGuard, kombu_redis.Channel):  # kombu has no type hints
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_ClosedConnectionGuard, kombu_redis.SentinelChannel):
    pass


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


TRANSPORT = f"{__name__}:Transport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"
SCHEMES = ("redis", "rediss", "unix", "socket")


def transport_for(redis_url: str) -> str | None:
    """The guarded transport for the router's Redis URL (None: kombu's choice by scheme)."""
    scheme = urlsplit(redis_url).scheme
    if scheme in SCHEMES:
        return TRANSPORT
    if scheme in ("sentinel", "sentinels"):
        return SENTINEL_TRANSPORT
    return None
