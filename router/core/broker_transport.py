"""The Celery broker transport: kombu's Redis transport, with one guard against a kombu defect.

Why: with kombu 5.7 and redis-py 8, a worker whose broker connection drops while a task runs
(``acks_late``: its message is unacknowledged) closes the connection, and closing the channel
restores unacknowledged messages through a new connection pool built from the connection's
client, which the close has already dropped. That raised ``AttributeError: 'NoneType' object
has no attribute 'hostname'``; Celery takes any error that is not a connection error as
unrecoverable, so the worker exited (seen in the chaos run: the batch worker, 3 Redis kills out
of 8). Here a missing client is what it means, a lost connection: a `redis.ConnectionError`,
which kombu and Celery already handle (the worker reconnects; the running task's message is
restored after the visibility timeout if its acknowledgement is lost, and every task of the
router is idempotent).

Used for ``redis://``, ``rediss://`` and unix-socket broker URLs (`hybrid_router.workers.celery_app`).
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
SCHEMES = ("redis", "rediss", "unix", "socket")
