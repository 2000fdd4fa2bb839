"""Everything a stream needs that lives as long as the worker process, built once per settings.

Every stream of a process runs on the process's one `StreamEngine` (an asyncio loop in its own
thread, with its async Redis pool, upstream connection pool and publisher); the context holds
the engine and the synchronous side shared with the sweep and the Celery tasks: a Redis pool,
the store, the lease keeper and the retry policy. Tests build a `StreamContext` directly and
call `hybrid_router.workers.stream.relay.run_stream` without Celery.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.retry import RetryPolicy
from hybrid_router.workers.stream.lease import LeaseKeeper

if TYPE_CHECKING:
    from hybrid_router.workers.stream.engine import StreamEngine


@dataclass
class StreamContext:
    settings: Settings
    redis: redis.Redis
    store: RequestStore
    leases: LeaseKeeper
    policy: RetryPolicy
    # Called with the id of every request this process moved to a terminal state that has a
    # callback_url (the Celery task wires `core.celery_app.send_callback`).
    notify: Callable[[str], None] = field(default=lambda _request_id: None)
    # Sends the stream task of a request again (the sweep, for a dispatched request whose
    # message was lost; the Celery task wires ``send_task``). Without Celery: not sent.
    redispatch: Callable[[str], None] = field(default=lambda _request_id: None)
    _engine: StreamEngine | None = field(default=None, repr=False)
    _engine_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def keys(self) -> Keys:
        return self.store.keys

    @property
    def engine(self) -> StreamEngine:
        """The process's stream engine, started on first use."""
        with self._engine_lock:
            if self._engine is None:
                from hybrid_router.workers.stream.engine import StreamEngine

                self._engine = StreamEngine(self)
                self._engine.start()
            return self._engine

    @classmethod
    def build(cls, settings: Settings) -> StreamContext:
        client = sync_client(settings.redis_url, max_connections=64,
                                      health_check_interval=30)
        store = RequestStore(client, settings)
        return cls(
            settings=settings,
            redis=client,
            store=store,
            leases=LeaseKeeper(client, store.keys, settings.stream_lease_s),
            policy=RetryPolicy.from_settings(settings),
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
        self.leases.shutdown()
        self.redis.close()


_contexts: dict[str, StreamContext] = {}
_lock = threading.Lock()


def context_for(settings: Settings) -> StreamContext:
    """The process-wide context of `settings` (created on first use, thread-safe)."""
    key = f"{settings.redis_url}|{settings.key_prefix}"
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = StreamContext.build(settings)
        return ctx
