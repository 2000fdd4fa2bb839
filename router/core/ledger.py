"""The cost ledger: tokens and cost per lane, tier and model, and what the cheaper lanes saved.

One Redis hash (`Keys.ledger()`); fields are ``<lane>|<tier>|<model>|<measure>``, where the lane
is ``stream``, ``flex`` or ``batch``, the tier is what served the request (``default``,
``flex``, ``priority``, or ``batch`` for a native batch) and the model is one the operator
named or ``other`` (`Settings.model_label`), so the hash is bounded. Fields written before
tiers existed (``<route>|<model>|<measure>``) are read as the lane's usual tier. Costs are kept in
integer pico-dollars (HINCRBY), so sums are exact: every price with up to six decimals per
million tokens is a whole number of pico-dollars per token, and so is half of it, so the batch
savings equal the batch share of the standard cost times the discount to the last digit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.pricing import BATCH_TIER, cost_usd, money_text
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings

PICO = Decimal(1_000_000_000_000)
MEASURES = ("requests", "prompt_tokens", "completion_tokens", "cost_pusd", "standard_cost_pusd")


def to_pico(amount: Decimal) -> int:
    return int((amount * PICO).to_integral_value())


def ledger_tier(route: str, tier: str | None, *, emulated: bool = False) -> str:
    """The tier a ledger line is filed under: the served tier of a plain call, ``batch`` for
    a native batch, ``default`` for an emulated one (plain calls at the standard price)."""
    if tier is not None:
        return tier
    if route == "batch":
        return "default" if emulated else BATCH_TIER
    return "default"


def ledger_increments(
    settings: Settings, route: str, model: str, usage: dict[str, Any] | None, *,
    emulated: bool = False, tier: str | None = None,
) -> tuple[Decimal, dict[str, int]]:
    """The cost of one result and the ledger fields to add for it. `route` is the lane that
    served it and `tier` the tier the upstream reported (None: the lane's usual one). The cost
    is the model's own; the fields are named after `Settings.model_label(model)`, so a
    tenant's made-up model names add to the `other` line instead of adding fields."""
    filed = ledger_tier(route, tier, emulated=emulated)
    paid = cost_usd(settings, model, usage, route, emulated=emulated,
                    tier=None if filed == BATCH_TIER else filed)
    standard = cost_usd(settings, model, usage, "stream")
    usage = usage or {}
    base = f"{route}|{filed}|{settings.model_label(model)}|"
    return paid, {
        base + "requests": 1,
        base + "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        base + "completion_tokens": int(usage.get("completion_tokens") or 0),
        base + "cost_pusd": to_pico(paid),
        base + "standard_cost_pusd": to_pico(standard),
    }


def add_to_ledger(pipe: Any, keys: Keys, increments: dict[str, int]) -> None:
    """Queue the increments on a (sync or async) pipeline or client."""
    for name, amount in increments.items():
        if amount:
            pipe.hincrby(keys.ledger(), name, amount)


@dataclass
class LedgerLine:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    standard_cost_usd: Decimal = Decimal(0)

    @property
    def savings_usd(self) -> Decimal:
        return self.standard_cost_usd - self.cost_usd

    def add(self, other: LedgerLine) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.standard_cost_usd += other.standard_cost_usd


@dataclass
class Ledger:
    lines: dict[tuple[str, str, str], LedgerLine] = field(default_factory=dict)  # lane, tier, model

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> Ledger:
        ledger = cls()
        for key, value in raw.items():
            name = text(key)
            parts = name.split("|")
            if len(parts) == 4:
                route, tier, model, measure = parts
            elif len(parts) == 3:  # written before tiers
                route, model, measure = parts
                tier = ledger_tier(route, None)
            else:
                continue
            line = ledger.lines.setdefault((route, tier, model), LedgerLine())
            amount = int(value)
            if measure == "cost_pusd":
                line.cost_usd = Decimal(amount) / PICO
            elif measure == "standard_cost_pusd":
                line.standard_cost_usd = Decimal(amount) / PICO
            elif measure in MEASURES:
                setattr(line, measure, amount)
        return ledger

    def relabelled(self, label: Callable[[str], str]) -> Ledger:
        """The same ledger with each model counted under `label(model)` (lines merged), so
        fields written before `Settings.model_label` existed are shown as the others are."""
        out = Ledger()
        for (route, tier, model), line in self.lines.items():
            out.lines.setdefault((route, tier, label(model)), LedgerLine()).add(line)
        return out

    def total(self, route: str | None = None, tier: str | None = None) -> LedgerLine:
        out = LedgerLine()
        for (line_route, line_tier, _model), line in self.lines.items():
            if route is not None and line_route != route:
                continue
            if tier is not None and line_tier != tier:
                continue
            out.add(line)
        return out

    def by_route_model(self) -> dict[tuple[str, str], LedgerLine]:
        """Lines per lane and model, every tier summed."""
        out: dict[tuple[str, str], LedgerLine] = {}
        for (route, _tier, model), line in self.lines.items():
            out.setdefault((route, model), LedgerLine()).add(line)
        return out

    def as_dict(self) -> dict[str, Any]:
        def line_dict(line: LedgerLine) -> dict[str, Any]:
            return {
                "requests": line.requests,
                "prompt_tokens": line.prompt_tokens,
                "completion_tokens": line.completion_tokens,
                "cost_usd": money_text(line.cost_usd),
                "standard_cost_usd": money_text(line.standard_cost_usd),
                "savings_usd": money_text(line.savings_usd),
            }

        tiers = sorted({tier for _r, tier, _m in self.lines})
        return {
            "by_route_model": [
                {"route": r, "model": m, **line_dict(line)}
                for (r, m), line in sorted(self.by_route_model().items())
            ],
            "by_lane_tier_model": [
                {"lane": r, "tier": t, "model": m, **line_dict(line)}
                for (r, t, m), line in sorted(self.lines.items())
            ],
            "total": line_dict(self.total()),
            "stream": line_dict(self.total("stream")),
            "flex": line_dict(self.total("flex")),
            "batch": line_dict(self.total("batch")),
            "by_tier": {tier: line_dict(self.total(tier=tier)) for tier in tiers},
        }
