"""Per-API-key rate limits: requests and tokens per minute, in atomic Redis counters.

Fixed one-minute windows (``Keys.rate(key_id, kind, window)``, ``window = unix minute``): one
Lua script checks both counters and only then adds to both, so a refused request consumes
nothing and concurrent API processes can never together let more through than the limit. A
fixed window lets a caller use up to twice the limit across a minute boundary; that is the
usual trade for O(1) memory and one round trip (docs/RELIABILITY.md).

The token cost of a request is estimated before it runs (as OpenAI does): the generous prompt
estimate of `hybrid_router.router.core.pricing.estimate_prompt_tokens` plus the completion cap the caller asked
for (``max_tokens`` / ``max_completion_tokens``), or `DEFAULT_COMPLETION_ESTIMATE` when none.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import redis

from hybrid_router.router.core.coalesce import ScriptCoalescer
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lua import LuaScript
from hybrid_router.router.core.pricing import estimate_prompt_tokens
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings

WINDOW_S = 60
DEFAULT_COMPLETION_ESTIMATE = 256
Kind = Literal["requests", "tokens"]

# KEYS: requests counter, tokens counter of the current window
# ARGV: rpm (0 = off), tpm (0 = off), tokens of this request, counter ttl
# -> {1, '', used} allowed and counted; {0, kind, used} refused, nothing counted
_CHECK_AND_COUNT = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local used_requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local used_tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and used_requests + 1 > rpm then return {0, 'requests', used_requests} end
if tpm > 0 and used_tokens + tokens > tpm then return {0, 'tokens', used_tokens} end
if rpm > 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
if tpm > 0 then
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {1, '', used_requests + 1}
"""
CHECK_AND_COUNT_SCRIPT = LuaScript(_CHECK_AND_COUNT)


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may go ahead; when not, which limit and when to retry."""

    allowed: bool
    kind: Kind | None = None
    limit: int = 0
    retry_after_s: int = 0
    too_large: bool = False  # the request alone needs more tokens than a whole window allows


def limits_enabled(settings: Settings) -> bool:
    return settings.rate_limit_rpm > 0 or settings.rate_limit_tpm > 0


def estimate_request_tokens(body: Any) -> int:
    """Tokens a chat-completion body may use: prompt estimate + the completion cap asked for.

    Tolerates any JSON (the limiter may run before the body is validated): a body that is not
    a chat completion counts as its size in characters / 4.
    """
    if not isinstance(body, dict):
        return 1
    messages = body.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        prompt = estimate_prompt_tokens(messages)
    elif messages is None and "input" in body:  # Responses API or embeddings
        prompt = max(1, len(orjson.dumps(body.get("input"), default=str)) // 4)
    else:
        prompt = max(1, len(str(messages or "")) // 4)
    completion = DEFAULT_COMPLETION_ESTIMATE
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            completion = min(value, 10_000_000)
            break
    return prompt + completion


def _window(now: float) -> tuple[int, int]:
    """The current window number and the whole seconds until it ends (at least 1)."""
    window = int(now // WINDOW_S)
    return window, max(1, math.ceil((window + 1) * WINDOW_S - now))


class RateLimiter:
    """Checks and counts one request against its key's per-minute limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)

    def _call(self, key_id: str, tokens: int, now: float) -> tuple[list[str], list[Any], int]:
        window, retry_after = _window(now)
        keys = [self.keys.rate(key_id, "requests", window), self.keys.rate(key_id, "tokens", window)]
        args = [self.settings.rate_limit_rpm, self.settings.rate_limit_tpm, tokens, WINDOW_S * 2]
        return keys, args, retry_after

    def _precheck(self, tokens: int) -> RateDecision | None:
        if not limits_enabled(self.settings):
            return RateDecision(True)
        tpm = self.settings.rate_limit_tpm
        if tpm > 0 and tokens > tpm:
            return RateDecision(False, "tokens", tpm, 0, too_large=True)
        return None

    def _decide(self, raw: Any, retry_after: int) -> RateDecision:
        if int(raw[0]) == 1:
            return RateDecision(True)
        kind_raw = text(raw[1])
        kind: Kind = "tokens" if kind_raw == "tokens" else "requests"
        limit = self.settings.rate_limit_tpm if kind == "tokens" else self.settings.rate_limit_rpm
        return RateDecision(False, kind, limit, retry_after)

    def check(self, client: redis.Redis, key_id: str, tokens: int,
              now: float | None = None) -> RateDecision:
        early = self._precheck(tokens)
        if early is not None:
            return early
        keys, args, retry_after = self._call(key_id, tokens, time.time() if now is None else now)
        return self._decide(CHECK_AND_COUNT_SCRIPT(client, keys, args), retry_after)

    async def check_async(self, scripts: ScriptCoalescer, key_id: str, tokens: int,
                          now: float | None = None) -> RateDecision:
        early = self._precheck(tokens)
        if early is not None:
            return early
        keys, args, retry_after = self._call(key_id, tokens, time.time() if now is None else now)
        return self._decide(await scripts.run(CHECK_AND_COUNT_SCRIPT, keys, args), retry_after)
