"""Prices: cost per lane (batch at the discount) and a budget turned into a max_tokens cap."""

from __future__ import annotations

from decimal import Decimal

from hybrid_router.router.core.pricing import cost_usd, estimate_prompt_tokens, lane_multiplier, max_tokens_for_budget
from hybrid_router.settings import Settings

S = Settings(_env_file=None)


def test_batch_costs_half() -> None:
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    assert cost_usd(S, "gpt-4o", usage, "stream") == Decimal("12.50")
    assert cost_usd(S, "gpt-4o", usage, "batch") == Decimal("6.25")
    assert cost_usd(S, "gpt-4o", usage, "batch", emulated=True) == Decimal("12.50")
    assert cost_usd(S, "gpt-4o", None, "stream") == 0
    assert lane_multiplier(S, "batch") == Decimal("0.5")


def test_unknown_model_uses_the_default_price() -> None:
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 0}
    assert cost_usd(S, "some-new-model", usage, "stream") == Decimal("1.00")


def test_budget_cap_per_lane() -> None:
    # gpt-4o: $2.50 in / $10 out per Mtok. $0.0125 - 1000 prompt tokens ($0.0025) = $0.01 left.
    assert max_tokens_for_budget(S, "gpt-4o", "stream", Decimal("0.0125"), 1000) == 1000
    # On the batch lane everything costs half: prompt $0.00125, $0.01125 left at $5/Mtok.
    assert max_tokens_for_budget(S, "gpt-4o", "batch", Decimal("0.0125"), 1000) == 2250


def test_budget_that_cannot_pay_the_prompt_is_zero() -> None:
    assert max_tokens_for_budget(S, "gpt-4o", "stream", Decimal("0.001"), 1000) == 0


def test_prompt_estimate_is_generous() -> None:
    small = estimate_prompt_tokens([{"role": "user", "content": "x" * 400}])
    assert small >= 100
    parts = estimate_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "y" * 400}]}])
    assert parts == small
