"""Retry policy shared by both lanes: bounded attempts, exponential backoff with full jitter,
and the upstream's ``retry-after`` honoured when it asks for longer."""

from __future__ import annotations

import random
from dataclasses import dataclass

import openai

from hybrid_router.settings import Settings

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base_s: float
    max_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(settings.stream_max_retries, settings.retry_backoff_base_s,
                   settings.retry_backoff_max_s)

    def backoff(self, attempt: int, retry_after_s: float | None = None,
                rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        ceiling = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        delay = (rng or random).uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_s))
        return delay

    def allows(self, attempt: int) -> bool:
        """Whether retry number `attempt` (1-based) is within the budget."""
        return attempt <= self.max_retries


def is_retryable(exc: BaseException) -> bool:
    """Connection problems, timeouts, 429 and 5xx are worth retrying; 4xx are not."""
    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS
    return False


def is_refusal(exc: BaseException) -> bool:
    """The upstream answered, and asking again later will not change its answer: an HTTP
    status that is not retryable (a 4xx other than 408, 409 and 429). Anything else (no answer,
    a timeout, a 429, a 5xx) may pass by waiting."""
    return isinstance(exc, openai.APIStatusError) and not is_retryable(exc)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The upstream's ``retry-after`` (seconds or ``retry-after-ms``), if it sent one."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:
        return None
    return None
