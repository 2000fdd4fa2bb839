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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # kombu has no type hints
    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client is None and self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        with super().conn_or_acquire(client) as acquired:
            yield acquired


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
