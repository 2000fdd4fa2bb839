"""Per-API-key rate limits: requests and tokens per minute, 429 with retry-after, nothing queued.

The limiter is exercised against the real Redis (atomicity under concurrent callers, window
roll-over, refused requests consuming nothing) and through the real API subprocess with the
official openai SDK as one of the clients, so the 429 is proven to be one OpenAI SDKs understand.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ratelimit import DEFAULT_COMPLETION_ESTIMATE, RateLimiter, estimate_request_tokens
from hybrid_router.settings import Settings
from tests.support import Stack, wait_until

KEY_A = "sk-rate-alpha"
KEY_B = "sk-rate-beta"


def away_from_window_edge(margin_s: float = 8.0) -> None:
    """Start a burst early enough in the minute window that it cannot straddle two windows."""
    wait_until(lambda: time.time() % 60 < 60 - margin_s, timeout=margin_s + 2, interval=0.2,
               message="a fresh rate-limit window")


# --- the limiter itself -------------------------------------------------------------------------

def test_sixth_request_in_a_minute_is_refused_with_retry_after(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    limiter = RateLimiter(make_settings(rate_limit_rpm=5))
    now = 60 * 16_667 + 20.0  # 20 s into a window
    decisions = [limiter.check(redis_client, "key-a", 10, now=now) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    refused = decisions[-1]
    assert refused.kind == "requests" and refused.limit == 5
    assert refused.retry_after_s == 40
    assert limiter.check(redis_client, "key-b", 10, now=now).allowed, "another key is separate"
    assert limiter.check(redis_client, "key-a", 10, now=now + 40).allowed, "next window is fresh"


def test_token_limit_counts_estimates_and_refusals_consume_nothing(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    settings = make_settings(rate_limit_tpm=1000)
    limiter = RateLimiter(settings)
    now = 2_000_010.0
    assert limiter.check(redis_client, "k", 700, now=now).allowed
    refused = limiter.check(redis_client, "k", 400, now=now)
    assert not refused.allowed and refused.kind == "tokens"
    assert limiter.check(redis_client, "k", 300, now=now).allowed, "the refusal took nothing"
    assert not limiter.check(redis_client, "k", 1, now=now).allowed
    too_big = limiter.check(redis_client, "other", 1001, now=now)
    assert not too_big.allowed and too_big.too_large
    window = int(now // 60)
    used = redis_client.get(Keys(settings.key_prefix).rate("k", "tokens", window))
    assert used == b"1000"
    ttl = redis_client.ttl(Keys(settings.key_prefix).rate("k", "tokens", window))
    assert 0 < ttl <= 120, "counters expire on their own"


def test_concurrent_callers_never_exceed_the_limit(
    make_settings: Callable[..., Settings], redis_base_url: str
) -> None:
    limiter = RateLimiter(make_settings(rate_limit_rpm=10))
    pool = redis.ConnectionPool.from_url(f"{redis_base_url}/0", max_connections=32)
    now = 3_000_005.0

    def one(_: int) -> bool:
        return limiter.check(redis.Redis(connection_pool=pool), "shared", 1, now=now).allowed

    with ThreadPoolExecutor(16) as pool_exec:
        results = list(pool_exec.map(one, range(64)))
    pool.disconnect()
    assert sum(results) == 10


def test_token_estimate_is_prompt_plus_completion_cap() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_request_tokens(body) == (400 + 16) // 4 + 1 + 50
    no_cap = {"messages": [{"role": "user", "content": "hi"}]}
    assert estimate_request_tokens(no_cap) == (2 + 16) // 4 + 1 + DEFAULT_COMPLETION_ESTIMATE
    assert estimate_request_tokens(["not", "a", "body"]) == 1
    assert estimate_request_tokens({"messages": "oops", "max_tokens": True}) >= 1


# --- through the API ----------------------------------------------------------------------------

@dataclass
class LimitedApi:
    url: str
    settings: Settings
    redis: redis.Redis

    def pending(self) -> int:
        return int(self.redis.llen(Keys(self.settings.key_prefix).pending("gpt-4o-mini")))

    def dispatched(self) -> int:
        return int(self.redis.zcard(Keys(self.settings.key_prefix).dispatched()))


@pytest.fixture
def limited_api(make_settings: Callable[..., Settings], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LimitedApi]:
    settings = make_settings(
        api_keys={KEY_A: "alpha", KEY_B: "beta"}, rate_limit_rpm=5, rate_limit_tpm=20_000,
        upstream_base_url="http://127.0.0.1:9/v1",
    )
    stack = Stack(settings, workdir=tmp_path_factory.mktemp("rate"))
    client = redis.Redis.from_url(settings.redis_url)
    try:
        yield LimitedApi(stack.start_api(), settings, client)
    finally:
        stack.stop()
        client.close()


def _submit(api: LimitedApi, key: str, **fields: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}],
            "priority": "low", **fields}
    return httpx.post(f"{api.url}/v1/requests", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {key}"})


def test_api_answers_429_with_retry_after_and_queues_nothing(limited_api: LimitedApi) -> None:
    away_from_window_edge()
    accepted = [_submit(limited_api, KEY_A) for _ in range(5)]
    assert [r.status_code for r in accepted] == [202] * 5
    assert limited_api.pending() == 5

    refused = _submit(limited_api, KEY_A)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_requests"
    assert "5 requests per minute" in error["message"]
    assert limited_api.pending() == 5, "nothing was queued for the refused request"

    sdk = openai.OpenAI(base_url=f"{limited_api.url}/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="gpt-4o-mini", extra_body={"priority": "high"},
                                    messages=[{"role": "user", "content": "chat too"}])
    assert caught.value.status_code == 429
    assert limited_api.dispatched() == 0, "the chat route queued nothing either"

    other = _submit(limited_api, KEY_B)
    assert other.status_code == 202, "another API key is unaffected"
    assert limited_api.pending() == 6


def test_api_token_limit_and_a_request_larger_than_the_limit(limited_api: LimitedApi) -> None:
    away_from_window_edge()
    assert _submit(limited_api, KEY_A, max_tokens=15_000).status_code == 202
    refused = _submit(limited_api, KEY_A, max_tokens=6_000)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_tokens"
    assert "retry-after" in refused.headers
    too_large = _submit(limited_api, KEY_B, max_tokens=25_000)
    assert too_large.status_code == 400, too_large.text
    assert too_large.json()["error"]["param"] == "max_tokens"
    assert limited_api.pending() == 1
