"""What the lanes have measured, kept in Redis for `hybrid_router.router.core.lanes.choose_lane`.

- **Expected latency** per lane and model (`Keys.lane_latency`): a rolling figure (an
  exponentially weighted mean, weight `ALPHA` for the newest) of the time from acceptance to
  the terminal state of each completed request, written by the stream engine for ``stream`` and
  ``flex``. Until a model has a figure, the settings' starting values stand.
- **Flex refused** (`Keys.flex_unsupported`): models the upstream answered 400 for at the flex
  tier, each until an expiry (`Settings.flex_unsupported_ttl_s`).

The intake reads both at most every `CACHE_S` seconds per process (`LaneFactsCache`), so the
hot path pays for them once in a while, not per request.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lanes import LaneFacts
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings

ALPHA = 0.2
CACHE_S = 2.0
# Bound of the refused-models hash: a made-up model name per request must not grow it.
MAX_REFUSED_MODELS = 1000

# KEYS[1] latency hash. ARGV: field, seconds, alpha.
_OBSERVE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local x = tonumber(ARGV[2])
local new = x
if old then new = old + tonumber(ARGV[3]) * (x - old) end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.6f', new))
redis.call('HINCRBY', KEYS[1], ARGV[1] .. '|n', 1)
return 1
"""

# KEYS[1] refused hash. ARGV: model, until, now, ttl, max fields. Prunes expired fields.
_REFUSE = """
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= tonumber(ARGV[3]) then redis.call('HDEL', KEYS[1], all[i]) end
end
if redis.call('HLEN', KEYS[1]) < tonumber(ARGV[5]) or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


def latency_field(settings: Settings, lane: str, model: str) -> str:
    return f"{lane}|{settings.model_label(model)}"


def facts_from(latency: dict[Any, Any], refused: dict[Any, Any]) -> LaneFacts:
    expected: dict[tuple[str, str], float] = {}
    for key, value in latency.items():
        parts = text(key).split("|")
        if len(parts) == 2:
            try:
                expected[(parts[0], parts[1])] = float(text(value))
            except ValueError:
                continue
    until: dict[str, float] = {}
    for key, value in refused.items():
        try:
            until[text(key)] = float(text(value))
        except ValueError:
            continue
    return LaneFacts(expected, until)


def expected_view(latency: dict[Any, Any]) -> list[dict[str, Any]]:
    """The rolling figures as `/v1/stats` shows them: lane, model, seconds, observations."""
    counts: dict[str, int] = {}
    for key, value in latency.items():
        name = text(key)
        if name.endswith("|n"):
            counts[name[:-2]] = int(text(value))
    rows = []
    for (lane, model), seconds in sorted(facts_from(latency, {}).expected_s.items()):
        rows.append({"lane": lane, "model": model, "expected_s": round(seconds, 3),
                     "observations": counts.get(f"{lane}|{model}", 0)})
    return rows


def read_facts(client: redis.Redis, settings: Settings) -> LaneFacts:
    keys = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.lane_latency())
    pipe.hgetall(keys.flex_unsupported())
    latency, refused = pipe.execute()
    return facts_from(latency, refused)


async def aread_facts(client: aioredis.Redis, settings: Settings) -> LaneFacts:
    keys = Keys(settings.key_prefix)
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.lane_latency())
        pipe.hgetall(keys.flex_unsupported())
        latency, refused = await pipe.execute()
    return facts_from(latency, refused)


async def aobserve_latency(client: aioredis.Redis, settings: Settings, lane: str, model: str,
                           seconds: float) -> None:
    """Fold one completed request's latency into the lane's rolling figure for the model."""
    keys = Keys(settings.key_prefix)
    await client.eval(_OBSERVE, 1, keys.lane_latency(), latency_field(settings, lane, model),
                      repr(max(seconds, 0.0)), repr(ALPHA))


def observe_latency(client: redis.Redis, settings: Settings, lane: str, model: str,
                    seconds: float) -> None:
    keys = Keys(settings.key_prefix)
    client.eval(_OBSERVE, 1, keys.lane_latency(), latency_field(settings, lane, model),
                repr(max(seconds, 0.0)), repr(ALPHA))


async def aremember_flex_refused(client: aioredis.Redis, settings: Settings, model: str) -> None:
    """Remember that the upstream refused `model` at the flex tier, for the configured TTL."""
    keys = Keys(settings.key_prefix)
    ttl = settings.flex_unsupported_ttl_s
    now = time.time()
    await client.eval(_REFUSE, 1, keys.flex_unsupported(), model, repr(now + ttl), repr(now),
                      ttl, MAX_REFUSED_MODELS)


class LaneFactsCache:
    """The facts, read again from Redis at most every `CACHE_S` seconds (one per process)."""

    def __init__(self, settings: Settings, max_age_s: float = CACHE_S) -> None:
        self.settings = settings
        self.max_age_s = max_age_s
        self._facts: LaneFacts | None = None
        self._read_at = 0.0

    def _stale(self) -> bool:
        return self._facts is None or time.monotonic() - self._read_at >= self.max_age_s

    def _keep(self, facts: LaneFacts) -> LaneFacts:
        self._facts, self._read_at = facts, time.monotonic()
        return facts

    async def get(self, client: aioredis.Redis) -> LaneFacts:
        """The facts, from the API's async client."""
        if self._stale():
            return self._keep(await aread_facts(client, self.settings))
        assert self._facts is not None
        return self._facts

    def get_sync(self, client: redis.Redis) -> LaneFacts:
        """The facts, from a sync client (the Python client's direct `enqueue()`)."""
        if self._stale():
            return self._keep(read_facts(client, self.settings))
        assert self._facts is not None
        return self._facts
