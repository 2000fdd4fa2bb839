"""Everything a stream needs that lives as long as the worker process, built once per settings.

The Celery threads pool runs many streams in one process; they share one Redis connection pool,
one openai client (its httpx pool), one publisher thread and one lease keeper. Tests build a
`StreamContext` directly and call `workers.streaming.run_stream` without Celery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import openai
import redis

from router.keys import Keys
from router.store import RequestStore
from settings import Settings
from workers.retry import RetryPolicy
from workers.stream_lease import LeaseKeeper
from workers.stream_publisher import StreamPublisher
from workers.upstream import make_openai_client


@dataclass
class StreamContext:
    settings: Settings
    redis: redis.Redis
    store: RequestStore
    client: openai.OpenAI
    publisher: StreamPublisher
    leases: LeaseKeeper
    policy: RetryPolicy
    sleep: Callable[[float], None] = field(default=time.sleep)
    # Called with the id of every request this process moved to a terminal state that has a
    # callback_url (the Celery task wires `workers.callbacks.schedule_callback`).
    notify: Callable[[str], None] = field(default=lambda _request_id: None)

    @property
    def keys(self) -> Keys:
        return self.store.keys

    @classmethod
    def build(cls, settings: Settings) -> StreamContext:
        pool_size = settings.stream_worker_concurrency * 2 + 16
        client = redis.Redis.from_url(settings.redis_url, max_connections=pool_size,
                                      health_check_interval=30)
        store = RequestStore(client, settings)
        return cls(
            settings=settings,
            redis=client,
            store=store,
            client=make_openai_client(settings),
            publisher=StreamPublisher(client, store.ops),
            leases=LeaseKeeper(client, store.keys, settings.stream_lease_s),
            policy=RetryPolicy.from_settings(settings),
        )

    def close(self) -> None:
        self.publisher.shutdown()
        self.leases.shutdown()
        self.client.close()
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
