"""A Redis lock with a random token and a renewed lease: only the holder can release or
extend it.

Flush and poll each run under one, so two of them never overlap (beat may fire again while a
slow flush still runs, or two batch workers may take the same tick). While held, a background
thread renews the lease every third of its TTL, so a long upload never loses the lock, and a
holder killed with SIGKILL blocks the next run for at most one TTL.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.redis_text import text_or_none
from hybrid_router.workers.batch.lua import LOCK_SCRIPT

log = get_logger(__name__)

LOCK_WAIT_STEP_S = 0.05


class RedisLock:
    """`acquire()` once; `extend()` while working; `release()` when done (safe if expired)."""

    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def extend(self) -> bool:
        return bool(LOCK_SCRIPT(self.client, [self.key], [self.token, self.ttl_ms]))

    def release(self) -> bool:
        return bool(LOCK_SCRIPT(self.client, [self.key], [self.token, ""]))

    def still_held(self) -> bool:
        """Whether Redis still gives the lock to us, now (not only at the last renewal): asked
        right before a step that another holder must never see half-done."""
        return text_or_none(self.client.get(self.key)) == self.token


def _renew(lock: RedisLock, stop: threading.Event) -> None:
    while not stop.wait(lock.ttl_ms / 3000):
        try:
            if not lock.extend():
                log.warning("lock lost while held", key=lock.key)
                return
        except redis.RedisError as exc:
            log.warning("lock renewal failed", key=lock.key, error=str(exc))


@contextmanager
def held(client: redis.Redis, key: str, ttl_s: float,
         wait_s: float = 0.0) -> Iterator[RedisLock | None]:
    """Yield the lock when acquired (None when somebody else holds it for longer than
    `wait_s`); release it after."""
    lock = RedisLock(client, key, ttl_s)
    deadline = time.monotonic() + wait_s
    while not lock.acquire():
        if time.monotonic() >= deadline:
            yield None
            return
        time.sleep(LOCK_WAIT_STEP_S)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, stop), daemon=True,
                               name=f"lock-renew:{key}")
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join(timeout=5)
        lock.release()
