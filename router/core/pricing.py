"""Prices: what a request cost on its lane, and a dollar budget turned into a token cap."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from hybrid_router.settings import Settings

MTOK = Decimal(1_000_000)
MAX_TOKENS_CAP = 1_000_000  # no model reaches it: "the budget does not limit the answer"
COST_QUANTUM = Decimal("0.000000000001")  # pico-dollars: exact for prices with <= 6 decimals per Mtok


def money_text(amount: Decimal) -> str:
    """A USD amount as JSON shows it: a decimal string in plain notation with 12 decimals
    (the ledger's pico-dollar resolution), e.g. ``"0.000225000000"``, never ``"0E-12"``.
    A string, not a JSON number, because a double cannot hold every such amount exactly."""
    return f"{amount:.12f}"


def lane_multiplier(settings: Settings, route: str, *, emulated: bool = False) -> Decimal:
    """1 on the stream lane (and emulated batches, which pay full price), else the discount."""
    if route == "batch" and not emulated:
        return Decimal(1) - settings.batch_discount
    return Decimal(1)


# --- tiers -------------------------------------------------------------------------------------
# What the upstream's ``service_tier`` says served a call; the ledger's tier of a native batch.
SERVED_TIERS = ("default", "flex", "priority")
BATCH_TIER = "batch"


def served_tier(reported: object, asked: str | None) -> str:
    """The tier a call is billed at: what the upstream reported (``default``, ``flex``,
    ``priority``); an upstream that reports nothing (or something else, e.g. ``auto``) is
    billed at the standard tier, never below what it may have charged."""
    del asked  # billing follows what served the call, not what was asked
    return reported if isinstance(reported, str) and reported in SERVED_TIERS else "default"


def tier_rates(settings: Settings, model: str, tier: str) -> tuple[Decimal, Decimal]:
    """(input, output) USD per million tokens of `model` at `tier`. A tier the price table
    does not list for the model is derived: flex at the batch discount (flex is sold at Batch
    API prices), priority at twice the standard rate (OpenAI's is 1.75-2x)."""
    price = settings.price_for(model)
    if tier == "flex":
        if price.flex_input_per_mtok is not None and price.flex_output_per_mtok is not None:
            return price.flex_input_per_mtok, price.flex_output_per_mtok
        factor = Decimal(1) - settings.batch_discount
        return price.input_per_mtok * factor, price.output_per_mtok * factor
    if tier == "priority":
        if price.priority_input_per_mtok is not None and price.priority_output_per_mtok is not None:
            return price.priority_input_per_mtok, price.priority_output_per_mtok
        return price.input_per_mtok * 2, price.output_per_mtok * 2
    return price.input_per_mtok, price.output_per_mtok


def cost_usd(
    settings: Settings,
    model: str,
    usage: dict[str, Any] | None,
    route: str,
    *,
    emulated: bool = False,
    tier: str | None = None,
) -> Decimal:
    """Cost of `usage` tokens of `model` on `route` (at `tier`, the tier that served a plain
    call: ``default``, ``flex`` or ``priority``), in USD, exact to 1e-12."""
    if not usage:
        return Decimal(0)
    prompt = Decimal(int(usage.get("prompt_tokens") or 0))
    completion = Decimal(int(usage.get("completion_tokens") or 0))
    if tier is not None and tier != BATCH_TIER:
        rate_in, rate_out = tier_rates(settings, model, tier)
        return ((prompt * rate_in + completion * rate_out) / MTOK).quantize(
            COST_QUANTUM, rounding=ROUND_HALF_EVEN)
    price = settings.price_for(model)
    standard = (prompt * price.input_per_mtok + completion * price.output_per_mtok) / MTOK
    return (standard * lane_multiplier(settings, route, emulated=emulated)).quantize(
        COST_QUANTUM, rounding=ROUND_HALF_EVEN
    )


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A cheap, deliberately generous prompt size estimate (about 4 characters a token)."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
        chars += 16  # role and framing
    return max(1, chars // 4 + 1)


def estimate_body_prompt_tokens(body: dict[str, Any]) -> int:
    """`estimate_prompt_tokens` of any endpoint's body: its ``messages``, or its ``input`` (a
    string, input items, strings or token ids)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return estimate_prompt_tokens([m for m in messages if isinstance(m, dict)])
    value = body.get("input")
    if isinstance(value, str):
        return estimate_prompt_tokens([{"content": value}])
    if isinstance(value, list):
        if value and all(isinstance(t, int) for t in value):
            return len(value)
        items: list[dict[str, Any]] = []
        tokens = 0
        for item in value:
            if isinstance(item, dict):
                items.append(item)
            elif isinstance(item, str):
                items.append({"content": item})
            elif isinstance(item, list):
                tokens += len(item)
        return tokens + (estimate_prompt_tokens(items) if items else 0) or 1
    return 1


def max_tokens_for_budget(
    settings: Settings, model: str, route: str, budget_usd: Decimal, prompt_tokens: int,
    tier: str | None = None,
) -> int:
    """Completion tokens that `budget_usd` buys after paying for the prompt; 0 if none.

    Raises nothing: the caller decides that 0 means "the budget cannot even pay the prompt".
    A flex request is capped at the standard rate (it may be moved to the standard tier).
    """
    if tier is not None and tier not in (BATCH_TIER, "flex"):
        rate_in, rate_out = tier_rates(settings, model, tier)
    else:
        price = settings.price_for(model)
        mult = lane_multiplier(settings, route)
        rate_in, rate_out = price.input_per_mtok * mult, price.output_per_mtok * mult
    prompt_cost = Decimal(prompt_tokens) * rate_in / MTOK
    left = budget_usd - prompt_cost
    if left <= 0:
        return 0
    per_token = rate_out / MTOK
    if per_token == 0 or left >= per_token * MAX_TOKENS_CAP:
        # A huge budget (1e308, 1e999999) must not overflow Decimal or int64.
        return MAX_TOKENS_CAP
    return int(left / per_token)
