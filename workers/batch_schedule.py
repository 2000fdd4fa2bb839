"""The beat schedule of the flush: the runtime flush interval, and early flushes.

Why a custom `celery.schedules.schedule` rather than a fast "should I flush?" task: beat asks
`is_due` about once a second anyway, so reading the interval there (cached for ~1 s) makes a
change made with ``PUT /v1/admin/config`` or ``hybrid-router config set flush-interval``
take effect at the next tick, with no restart and without a task message every second. The
same check sends a flush at once when a model's queue has reached `flush_early_threshold`
(one SMEMBERS + pipelined LLEN, cheap), so a burst does not wait for the interval.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.schedules import schedstate, schedule

from router.keys import Keys
from router.logs import get_logger
from router.redis_text import text
from router.runtime_config import FLUSH_INTERVAL, validate_flush_interval

log = get_logger(__name__)

TICK_S = 1.0
CACHE_S = 1.0


class RuntimeFlushSchedule(schedule):
    """Every runtime flush interval (read from Redis), or at once when a queue is long."""

    def __init__(self, redis_url: str, key_prefix: str, default_s: float,
                 early_threshold: int, app: Any = None) -> None:
        super().__init__(run_every=timedelta(seconds=default_s), app=app)
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.default_s = default_s
        self.early_threshold = early_threshold
        self._client: redis.Redis | None = None
        self._cached_at = 0.0
        self._interval = default_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.redis_url, self.key_prefix, self.default_s,
                                 self.early_threshold))

    def __repr__(self) -> str:
        return f"<runtime flush interval, default {self.default_s:g}s>"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        return self._client

    def interval(self) -> float:
        """The runtime interval, cached for `CACHE_S` (the default if Redis cannot answer)."""
        if time.monotonic() - self._cached_at >= CACHE_S:
            self._cached_at = time.monotonic()
            try:
                raw = self.client.hget(Keys(self.key_prefix).runtime_config(), FLUSH_INTERVAL)
                self._interval = (validate_flush_interval(float(raw)) if raw is not None
                                  else self.default_s)
            except (redis.RedisError, ValueError) as exc:
                log.warning("runtime flush interval unreadable; using last", error=str(exc))
        return self._interval

    def queue_over_threshold(self) -> bool:
        keys = Keys(self.key_prefix)
        try:
            models = list(self.client.smembers(keys.pending_models()))
            if not models:
                return False
            pipe = self.client.pipeline(transaction=False)
            for model in models:
                pipe.llen(keys.pending(text(model)))
            return any(int(n) >= self.early_threshold for n in pipe.execute())
        except redis.RedisError:
            return False

    def is_due(self, last_run_at: datetime) -> schedstate:
        self.run_every = timedelta(seconds=self.interval())
        state = super().is_due(last_run_at)
        if state.is_due:
            return schedstate(True, min(TICK_S, state.next))
        if self.queue_over_threshold():
            log.info("queue over flush_early_threshold; flushing early")
            return schedstate(True, TICK_S)
        return schedstate(False, min(TICK_S, state.next))
