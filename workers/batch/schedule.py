"""The beat schedules of the batch lane: housekeeping is sent only when it has work.

Why custom `celery.schedules.schedule` classes rather than a fast "anything to do?" task: beat
asks `is_due` about once a second anyway, so checking Redis there (a few cheap reads) keeps
empty flushes and polls out of the task queue and out of Flower, which lists every task sent.

- The flush (`RuntimeFlushSchedule`) runs at the runtime flush interval (read from Redis,
  cached for ~1 s, so ``PUT /v1/admin/config`` or ``hybrid-router config set flush-interval``
  takes effect at the next tick), and only when there is something to flush or settle: a
  model queue that is not empty, a claim left by a flush that died, or an upload watched for
  late twin batches. Once the interval has passed, the first such work is flushed at the next
  tick; a queue that reaches `flush_early_threshold` is flushed at once.
- The poll (`PollSchedule`) runs at the poll interval while batches are in flight, or while a
  queued request has a deadline that the next flush plus a batch turnaround might miss (the
  poll escalates those to the stream lane).

If Redis cannot answer, the task is sent as if there were work: the task itself copes.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.schedules import schedstate, schedule

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.runtime_config import FLUSH_INTERVAL, validate_flush_interval

log = get_logger(__name__)

TICK_S = 1.0
CACHE_S = 1.0


def _runtime_flush_interval(client: redis.Redis, keys: Keys, default_s: float) -> float:
    raw = client.hget(keys.runtime_config(), FLUSH_INTERVAL)
    return validate_flush_interval(float(raw)) if raw is not None else default_s


class RuntimeFlushSchedule(schedule):
    """Every runtime flush interval (read from Redis) when there is work, or at once when a
    queue is long."""

    def __init__(self, redis_url: str, key_prefix: str, default_s: float,
                 early_threshold: int, report: dict[str, str] | None = None,
                 app: Any = None) -> None:
        super().__init__(run_every=timedelta(seconds=default_s), app=app)
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.default_s = default_s
        self.early_threshold = early_threshold
        self.report = dict(report or {})  # beat's settings, published at its first tick
        self._client: redis.Redis | None = None
        self._cached_at = 0.0
        self._interval = default_s
        self._reported = False
        self._beat_at = 0.0

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.redis_url, self.key_prefix, self.default_s,
                                 self.early_threshold, self.report))

    def heartbeat(self) -> None:
        """Beat's report in `Keys.beat()`: the time of this tick (at most once per `TICK_S`)
        and, at the first tick, the settings it runs with, its host and pid. `config get`,
        `status`, `/v1/stats` read it, and ``hybrid-router beat --check`` checks its age."""
        wall = time.time()
        if self._reported and wall - self._beat_at < TICK_S:
            return
        mapping: dict[Any, Any] = {"at": repr(wall)}
        if not self._reported:
            mapping.update(self.report, started_at=repr(wall), host=socket.gethostname(),
                           pid=str(os.getpid()))
        try:
            key = Keys(self.key_prefix).beat()
            if not self._reported:
                pipe = self.client.pipeline()
                pipe.delete(key)  # the previous beat's report goes with it
                pipe.hset(key, mapping=mapping)
                pipe.execute()
            else:
                self.client.hset(key, mapping=mapping)
        except redis.RedisError as exc:
            log.warning("beat heartbeat not written", error=str(exc))
            return
        self._reported, self._beat_at = True, wall

    def __repr__(self) -> str:
        return f"<runtime flush interval, default {self.default_s:g}s>"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = sync_client(self.redis_url, socket_timeout=2)
        return self._client

    def interval(self) -> float:
        """The runtime interval, cached for `CACHE_S` (the default if Redis cannot answer)."""
        if time.monotonic() - self._cached_at >= CACHE_S:
            self._cached_at = time.monotonic()
            try:
                self._interval = _runtime_flush_interval(self.client, Keys(self.key_prefix),
                                                         self.default_s)
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

    def has_work(self) -> bool:
        """A pending request to flush, an orphaned claim to recover, or a watched upload."""
        keys = Keys(self.key_prefix)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(keys.claims())
            pipe.zcard(keys.late_twin_watch())
            pipe.smembers(keys.pending_models())
            claims, watched, models = pipe.execute()
            if claims or watched:
                return True
            pipe = self.client.pipeline(transaction=False)
            for model in models:
                pipe.llen(keys.pending(text(model)))
            return any(int(n) > 0 for n in pipe.execute())
        except redis.RedisError:
            return True

    def is_due(self, last_run_at: datetime) -> schedstate:
        self.heartbeat()
        self.run_every = timedelta(seconds=self.interval())
        state = super().is_due(last_run_at)
        if state.is_due:
            if not self.has_work():
                return schedstate(False, TICK_S)  # look again next tick
            return schedstate(True, min(TICK_S, state.next))
        if self.queue_over_threshold():
            log.info("queue over flush_early_threshold; flushing early")
            return schedstate(True, TICK_S)
        return schedstate(False, min(TICK_S, state.next))


class PollSchedule(schedule):
    """Every poll interval while batches are in flight or a queued deadline needs watching."""

    def __init__(self, redis_url: str, key_prefix: str, poll_s: float, flush_default_s: float,
                 turnaround_s: float, app: Any = None) -> None:
        super().__init__(run_every=timedelta(seconds=poll_s), app=app)
        self.redis_url = redis_url
        self.key_prefix = key_prefix
        self.poll_s = poll_s
        self.flush_default_s = flush_default_s
        self.turnaround_s = turnaround_s
        self._client: redis.Redis | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.redis_url, self.key_prefix, self.poll_s,
                                 self.flush_default_s, self.turnaround_s))

    def __repr__(self) -> str:
        return f"<every {self.poll_s:g}s while batches are in flight>"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = sync_client(self.redis_url, socket_timeout=2)
        return self._client

    def has_work(self) -> bool:
        """A batch in flight, or a queued request whose deadline falls before the latest the
        next flush could start plus a batch turnaround (what the poll's escalation checks)."""
        keys = Keys(self.key_prefix)
        try:
            if self.client.zcard(keys.batches_in_flight()):
                return True
            horizon = (now() + _runtime_flush_interval(self.client, keys, self.flush_default_s)
                       + self.turnaround_s)
            return bool(self.client.zcount(keys.batch_deadlines(), "-inf", horizon))
        except (redis.RedisError, ValueError):
            return True

    def is_due(self, last_run_at: datetime) -> schedstate:
        state = super().is_due(last_run_at)
        if state.is_due and not self.has_work():
            return schedstate(False, TICK_S)  # look again next tick
        return state
