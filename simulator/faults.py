"""Fault decisions: which request fails, which stream drops, which batch expires.

Two sources, directives first: per-prompt directives (``[[sim:fail=429,times=2]]``), whose
``times`` counters are kept per prompt hash so that retries of the same prompt eventually
succeed, and global rates drawn from one RNG seeded by ``SimConfig.seed`` so that a run with the
same request order sees the same faults.
"""

from __future__ import annotations

import random
from collections import defaultdict

from hybrid_router.simulator.config import SimConfig
from hybrid_router.simulator.directives import Directives
from hybrid_router.simulator.errors import SimError, flex_not_supported, flex_unavailable, injected


class Faults:
    """Holds the seeded RNG and the per-prompt attempt counters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.fail_counts: dict[str, int] = defaultdict(int)
        self.drop_counts: dict[str, int] = defaultdict(int)
        self.flex_counts: dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.fail_counts.clear()
        self.drop_counts.clear()
        self.flex_counts.clear()

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def request_error(self, prompt_hash: str, d: Directives) -> SimError | None:
        """The error this chat request must get instead of an answer, if any."""
        if d.fail is not None:
            self.fail_counts[prompt_hash] += 1
            if d.times is None or self.fail_counts[prompt_hash] <= d.times:
                retry_after = d.retry_after
                if retry_after is None and d.fail == 429:
                    retry_after = self.config.retry_after_s
                return injected(d.fail, retry_after)
            return None
        c = self.config
        if self._roll(c.rate_429):
            return injected(429, c.retry_after_s)
        if self._roll(c.rate_500):
            return injected(500, None)
        if self._roll(c.rate_503):
            return injected(503, c.retry_after_s)
        return None

    def flex_error(self, prompt_hash: str, d: Directives, model: str,
                   flex_in_flight: int) -> SimError | None:
        """The error a flex call must get instead of an answer, if any: 400 for a model without
        flex, 429 resource unavailable by directive, by rate or above the flex concurrency."""
        c = self.config
        if d.flex_400 or model in c.no_flex_models:
            return flex_not_supported(model)
        if d.flex_429 is not None:
            self.flex_counts[prompt_hash] += 1
            if self.flex_counts[prompt_hash] <= d.flex_429:
                return flex_unavailable(d.retry_after if d.retry_after is not None else 0.05)
            return None
        if c.flex_max_concurrency and flex_in_flight >= c.flex_max_concurrency:
            return flex_unavailable(c.retry_after_s)
        if self._roll(c.flex_rate_429):
            return flex_unavailable(c.retry_after_s)
        return None

    def drop_after(self, prompt_hash: str, d: Directives, is_continuation: bool) -> int | None:
        """After how many content tokens this stream's connection drops (None = it does not).

        A directive drop only hits requests without an assistant prefill, and only the first
        ``drop_times`` of them, so the router's resume request always goes through.
        """
        if d.drop_after is not None:
            if is_continuation or self.drop_counts[prompt_hash] >= d.drop_times:
                return None
            self.drop_counts[prompt_hash] += 1
            return d.drop_after
        if self._roll(self.config.rate_drop):
            return self.config.drop_after_tokens
        return None

    def batch_fate(self, d: Directives) -> str:
        """``fail``, ``expire`` or ``complete`` for a new batch."""
        if d.batch in ("fail", "expire"):
            return d.batch
        if self._roll(self.config.batch_fail_rate):
            return "fail"
        if self._roll(self.config.batch_expire_rate):
            return "expire"
        return "complete"
