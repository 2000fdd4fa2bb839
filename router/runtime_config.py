"""Settings changed at runtime without a restart (today: the flush interval).

Stored in one Redis hash (`Keys.runtime_config()`); a missing field means "use `Settings`".
Beat reads it at every tick (see `workers.batch_schedule`), the intake reads it to classify
deadlines, the admin API and the ``config`` CLI verb write it.
"""

from __future__ import annotations

import math

import redis
import redis.asyncio as aioredis

from router.keys import Keys
from settings import Settings
from settings.config import MIN_FLUSH_INTERVAL_S

FLUSH_INTERVAL = "flush_interval_s"
MAX_FLUSH_INTERVAL_S = 7 * 24 * 3600.0


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
        return validate_flush_interval(float(raw))
    except ValueError:
        return default


def get_flush_interval(client: redis.Redis, settings: Settings) -> float:
    raw = client.hget(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL)
    return _parse(raw, settings.flush_interval_s)


def set_flush_interval(client: redis.Redis, settings: Settings, seconds: float) -> float:
    value = validate_flush_interval(seconds)
    client.hset(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL, repr(value))
    return value


async def get_flush_interval_async(client: aioredis.Redis, settings: Settings) -> float:
    raw = await client.hget(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL)
    return _parse(raw, settings.flush_interval_s)


async def set_flush_interval_async(
    client: aioredis.Redis, settings: Settings, seconds: float
) -> float:
    value = validate_flush_interval(seconds)
    await client.hset(Keys(settings.key_prefix).runtime_config(), FLUSH_INTERVAL, repr(value))
    return value


def runtime_view(flush_interval_s: float, settings: Settings) -> dict[str, float | bool]:
    """What `GET /v1/admin/config` and `config get` show."""
    return {
        "flush_interval_s": flush_interval_s,
        "flush_interval_overridden": flush_interval_s != settings.flush_interval_s,
        "poll_interval_s": settings.poll_interval_s,
    }
