"""Settings changed at runtime without a restart (today: the flush interval), and the values
the running service reports about itself.

- The **run-time override** lives in one Redis hash (`Keys.runtime_config()`): the interval,
  when it was set and by whom. A missing field means "use the setting". It outlives restarts
  of every process (it is in Redis, not in a process), which is why everything that shows the
  flush interval also shows where it comes from, and ``hybrid-router config reset
  flush-interval`` (`reset_flush_interval`) removes it.
- **Beat reports** what it runs with (`Keys.beat()`): at every tick (about once a second) it
  writes the time of the tick, and once at start its flush and poll settings, host and pid
  (`hybrid_router.workers.batch.schedule.RuntimeFlushSchedule`). Beat is the process that applies both
  intervals, so its report, not the environment of whoever asks, is the honest source of the
  running service's values (`config get`, `status`, `/v1/stats`, the `up` banner, and the
  liveness check ``hybrid-router beat --check``).

Beat reads the override at every tick (see `hybrid_router.workers.batch.schedule`), the intake reads it to
classify deadlines, the admin API and the ``config`` CLI verb write it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings
from hybrid_router.settings.config import MIN_FLUSH_INTERVAL_S

FLUSH_INTERVAL = "flush_interval_s"
FLUSH_INTERVAL_SET_AT = "flush_interval_set_at"
FLUSH_INTERVAL_SET_BY = "flush_interval_set_by"
OVERRIDE_FIELDS = (FLUSH_INTERVAL, FLUSH_INTERVAL_SET_AT, FLUSH_INTERVAL_SET_BY)
MAX_FLUSH_INTERVAL_S = 7 * 24 * 3600.0

SOURCE_OVERRIDE = "run-time override"
SOURCE_SETTING = "ROUTER_FLUSH_INTERVAL_S"
RESET_HINT = "hybrid-router config reset flush-interval"

# What beat reports about itself (`Keys.beat()`), besides `at` (last tick), `started_at`,
# `host` and `pid`.
BEAT_SETTINGS = ("flush_interval_s", "poll_interval_s", "expected_batch_turnaround_s",
                 "flush_early_threshold")


def validate_flush_interval(value: float) -> float:
    """A usable interval in seconds, or ValueError saying what is wrong."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"flush_interval_s must be a finite number of seconds, got {value!r}")
    if value < MIN_FLUSH_INTERVAL_S:
        raise ValueError(f"flush_interval_s must be at least {MIN_FLUSH_INTERVAL_S:g} seconds, "
                         f"got {value!r}")
    if value > MAX_FLUSH_INTERVAL_S:
        raise ValueError(f"flush_interval_s must be at most {MAX_FLUSH_INTERVAL_S:g} (one week)")
    return value


def _parse(raw: bytes | str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        return validate_flush_interval(float(text(raw)))
    except ValueError:
        return default


def _float(raw: Any) -> float | None:
    try:
        return float(text(raw)) if raw is not None else None
    except ValueError:
        return None


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BeatReport:
    """What the running beat said about itself (`Keys.beat()`)."""

    at: float | None  # its last tick
    started_at: float | None
    host: str
    pid: int | None
    values: dict[str, float]  # BEAT_SETTINGS as beat runs with them

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> BeatReport | None:
        data = {text(k): text(v) for k, v in raw.items()}
        if not data:
            return None
        values = {name: v for name in BEAT_SETTINGS if (v := _float(data.get(name))) is not None}
        pid = data.get("pid", "")
        return cls(at=_float(data.get("at")), started_at=_float(data.get("started_at")),
                   host=data.get("host", "?"), pid=int(pid) if pid.isdigit() else None,
                   values=values)

    def age_s(self, now: float | None = None) -> float | None:
        return None if self.at is None else max((now or time.time()) - self.at, 0.0)

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        age = self.age_s(now)
        return {"host": self.host, "pid": self.pid, "started_at": self.started_at,
                "last_tick_at": self.at, "last_tick_age_s": None if age is None else round(age, 3),
                "settings": self.values}


@dataclass
class FlushInterval:
    """The flush interval in force and where it comes from."""

    seconds: float
    source: str  # SOURCE_OVERRIDE or SOURCE_SETTING
    setting_s: float  # ROUTER_FLUSH_INTERVAL_S as the service runs with it
    setting_of: str  # "beat" (it reported it) or "this process" (no beat has reported)
    set_at: float | None = None
    set_by: str | None = None

    @property
    def overridden(self) -> bool:
        return self.source == SOURCE_OVERRIDE

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "source": self.source, "set_at": self.set_at,
                "set_by": self.set_by, "setting_s": self.setting_s, "setting_of": self.setting_of}

    def describe(self) -> str:
        """One human line, e.g. for the `up` banner and `status`."""
        if self.overridden:
            when = iso_utc(self.set_at) if self.set_at is not None else "at an unknown time"
            return (f"{self.seconds:g}s (run-time override set {when} by {self.set_by or '?'}; "
                    f"ROUTER_FLUSH_INTERVAL_S is {self.setting_s:g}s; `{RESET_HINT}` removes it)")
        where = "of beat" if self.setting_of == "beat" else "of this process; no beat reported"
        return f"{self.seconds:g}s (ROUTER_FLUSH_INTERVAL_S {where})"


def flush_interval_from(config: dict[Any, Any], beat: BeatReport | None,
                        settings: Settings) -> FlushInterval:
    """The interval beat applies: the override when valid, else beat's own setting (else this
    process's, when no beat has reported)."""
    data = {text(k): text(v) for k, v in config.items()}
    if beat is not None and "flush_interval_s" in beat.values:
        setting, of = beat.values["flush_interval_s"], "beat"
    else:
        setting, of = settings.flush_interval_s, "this process"
    raw = data.get(FLUSH_INTERVAL)
    if raw is not None:
        try:
            seconds = validate_flush_interval(float(raw))
        except ValueError:
            pass
        else:
            return FlushInterval(seconds, SOURCE_OVERRIDE, setting, of,
                                 set_at=_float(data.get(FLUSH_INTERVAL_SET_AT)),
                                 set_by=data.get(FLUSH_INTERVAL_SET_BY))
    return FlushInterval(setting, SOURCE_SETTING, setting, of)


def read_flush_interval(client: redis.Redis, settings: Settings) -> tuple[FlushInterval,
                                                                           BeatReport | None]:
    """The interval in force and beat's report (one round trip)."""
    keys = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.runtime_config())
    pipe.hgetall(keys.beat())
    config, beat_raw = pipe.execute()
    beat = BeatReport.from_hash(beat_raw)
    return flush_interval_from(config, beat, settings), beat


async def read_flush_interval_async(
    client: aioredis.Redis, settings: Settings
) -> tuple[FlushInterval, BeatReport | None]:
    keys = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.runtime_config())
    pipe.hgetall(keys.beat())
    config, beat_raw = await pipe.execute()
    beat = BeatReport.from_hash(beat_raw)
    return flush_interval_from(config, beat, settings), beat


def get_flush_interval(client: redis.Redis, settings: Settings) -> float:
    raw = client.hget(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL)
    return _parse(raw, settings.flush_interval_s)


def _override_mapping(value: float, by: str) -> dict[Any, Any]:
    return {FLUSH_INTERVAL: repr(value), FLUSH_INTERVAL_SET_AT: repr(time.time()),
            FLUSH_INTERVAL_SET_BY: by}


def set_flush_interval(client: redis.Redis, settings: Settings, seconds: float,
                       by: str = "unknown") -> float:
    value = validate_flush_interval(seconds)
    client.hset(Keys(settings.key_prefix).runtime_config(), mapping=_override_mapping(value, by))
    return value


def reset_flush_interval(client: redis.Redis, settings: Settings) -> bool:
    """Remove the run-time override (beat goes back to its setting); False if there was none."""
    return bool(client.hdel(Keys(settings.key_prefix).runtime_config(), *OVERRIDE_FIELDS))


async def get_flush_interval_async(client: aioredis.Redis, settings: Settings) -> float:
    raw = await client.hget(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL)
    return _parse(raw, settings.flush_interval_s)


async def set_flush_interval_async(
    client: aioredis.Redis, settings: Settings, seconds: float, by: str = "unknown"
) -> float:
    value = validate_flush_interval(seconds)
    await client.hset(Keys(settings.key_prefix).runtime_config(),
                      mapping=_override_mapping(value, by))
    return value


def beat_settings(settings: Settings) -> dict[str, str]:
    """What beat publishes about its settings (`BEAT_SETTINGS`)."""
    return {name: repr(float(getattr(settings, name))) for name in BEAT_SETTINGS}


def runtime_view(interval: FlushInterval, beat: BeatReport | None,
                 settings: Settings) -> dict[str, Any]:
    """What `GET /v1/admin/config` and `config get` show: the running service's values, as
    beat reported them; where no beat has reported, this process's settings, and it says so."""
    values = beat.values if beat is not None else {}
    return {
        "flush_interval_s": interval.seconds,
        "flush_interval_overridden": interval.overridden,
        "flush_interval": interval.as_dict(),
        "poll_interval_s": values.get("poll_interval_s", settings.poll_interval_s),
        "expected_batch_turnaround_s": values.get("expected_batch_turnaround_s",
                                                  settings.expected_batch_turnaround_s),
        "reported_by": ("beat" if beat is not None
                        else "this process (no beat has reported to this Redis and prefix)"),
        "beat": beat.as_dict() if beat is not None else None,
    }
