"""The lane choice (`hybrid_router.router.core.lanes.choose_lane`), the flex verdict under pressure
(`hybrid_router.workers.stream.flex_pressure.flex_verdict`) and tier prices, one function each, without I/O."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from hybrid_router.router.core.lane_facts import expected_view, facts_from
from hybrid_router.router.core.lanes import LaneFacts, choose_lane
from hybrid_router.router.core.ledger import Ledger, ledger_increments
from hybrid_router.router.core.pricing import cost_usd, served_tier, tier_rates
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.settings import DEFAULT_PRICES, Settings
from hybrid_router.workers.stream.flex_pressure import flex_verdict, is_flex_refusal, is_resource_unavailable

FLEX = "gpt-5-mini"
PLAIN = "gpt-4o-mini"


def s(**values: Any) -> Settings:
    base: dict[str, Any] = {"flush_interval_s": 60, "expected_batch_turnaround_s": 3600,
                            "expected_flex_latency_s": 60, "expected_stream_latency_s": 10}
    base.update(values)
    return Settings(_env_file=None, **base)


def test_low_without_deadline_batches_on_any_model() -> None:
    for model in (FLEX, PLAIN):
        d = choose_lane("low", None, model, s())
        assert d.route == "batch" and d.tier is None and d.expected_latency_s == 3660


def test_normal_defaults_to_flex_where_the_model_has_a_flex_price() -> None:
    d = choose_lane("normal", None, FLEX, s())
    assert (d.route, d.tier, d.expected_latency_s) == ("flex", "flex", 60)
    assert "900" in d.reason and "normal default" in d.reason
    assert choose_lane("normal", None, PLAIN, s()).route == "stream"
    assert choose_lane("normal", None, FLEX, s(flex=False)).route == "stream"


def test_deadline_picks_the_cheapest_lane_that_fits() -> None:
    assert choose_lane("low", 3660, FLEX, s()).route == "batch"
    d = choose_lane("low", 3659, FLEX, s())
    assert d.route == "flex" and "3660" in d.reason
    d = choose_lane("low", 59, FLEX, s())
    assert d.route == "stream" and d.tier == "default"
    assert "3660" in d.reason and "60" in d.reason
    assert choose_lane("low", 59, PLAIN, s()).route == "stream"


def test_learned_latency_replaces_the_starting_value() -> None:
    facts = LaneFacts({("flex", FLEX): 12.5, ("stream", FLEX): 1.5})
    d = choose_lane("normal", 30, FLEX, s(), facts=facts)
    assert d.route == "flex" and d.expected_latency_s == 12.5
    slow = LaneFacts({("flex", FLEX): 45.0})
    d = choose_lane("normal", 30, FLEX, s(), facts=slow)
    assert d.route == "stream" and "45" in d.reason


def test_a_flex_refusal_counts_until_it_expires() -> None:
    facts = LaneFacts(flex_refused_until={FLEX: 1000.0})
    d = choose_lane("normal", None, FLEX, s(), facts=facts, now=999.0)
    assert d.route == "stream" and "refused flex" in d.reason
    assert choose_lane("normal", None, FLEX, s(), facts=facts, now=1001.0).route == "flex"


def test_high_streams_at_once_at_the_priority_tier_only_where_configured() -> None:
    assert choose_lane("high", 10**6, FLEX, s()).tier == "default"
    d = choose_lane("high", None, FLEX, s(priority_tier_models=[FLEX]))
    assert (d.route, d.tier) == ("stream", "priority")
    assert choose_lane("high", None, "gpt-5", s(priority_tier_models=[FLEX])).tier == "default"
    assert choose_lane("high", None, "gpt-5", s(priority_tier_models=["*"])).tier == "priority"
    # gpt-5-nano has no priority price: never sent at the priority tier by the router.
    assert choose_lane("high", None, "gpt-5-nano", s(priority_tier_models=["*"])).tier == "default"


def test_a_client_tier_is_honoured() -> None:
    assert choose_lane("low", None, PLAIN, s(), client_tier="flex").route == "flex"
    d = choose_lane("normal", None, FLEX, s(), client_tier="priority")
    assert (d.route, d.tier) == ("stream", "priority")
    assert choose_lane("normal", None, FLEX, s(), client_tier="default").tier == "default"
    assert choose_lane("normal", None, FLEX, s(), client_tier="auto").route == "flex"


def test_the_drop_in_never_gets_the_batch_lane() -> None:
    d = choose_lane("normal", None, PLAIN, s(normal_route="batch"), batch_allowed=False)
    assert d.route == "stream"
    assert choose_lane("normal", None, PLAIN, s(normal_route="batch")).route == "batch"


def test_facts_read_back_from_redis_hashes() -> None:
    facts = facts_from({b"flex|gpt-5-mini": b"2.5", b"flex|gpt-5-mini|n": b"3", b"x": b"y"},
                       {b"gpt-5-nano": b"123.0"})
    assert facts.expected_s == {("flex", "gpt-5-mini"): 2.5}
    assert facts.flex_refused_until == {"gpt-5-nano": 123.0}
    assert expected_view({b"flex|gpt-5-mini": b"2.5", b"flex|gpt-5-mini|n": b"3"}) == [
        {"lane": "flex", "model": "gpt-5-mini", "expected_s": 2.5, "observations": 3}]


def _record(**values: Any) -> RequestRecord:
    base: dict[str, Any] = {"id": "a" * 32, "tenant": "t", "priority": "normal", "route": "flex",
                            "status": "streaming", "model": FLEX, "created_at": 1000.0,
                            "expected_latency_s": 5.0}
    base.update(values)
    return RequestRecord(**base)


def test_flex_verdict_retries_while_the_deadline_allows() -> None:
    settings = s(flex_max_retries=3, flush_interval_s=1, expected_batch_turnaround_s=30)
    record = _record(deadline_at=1020.0)
    v = flex_verdict(record, settings, retries_so_far=0, backoff_s=1.0, relayed_anything=False,
                     may_batch=True, now=1001.0)
    assert v.action == "retry" and v.delay_s == 1.0
    # Too little time left for another wait plus flex: standard at once (deadline near).
    v = flex_verdict(record, settings, retries_so_far=0, backoff_s=1.0, relayed_anything=False,
                     may_batch=True, now=1015.0)
    assert v.action == "standard" and "near" in v.reason


def test_flex_verdict_moves_far_deadlines_to_batch_once_retries_are_spent() -> None:
    settings = s(flex_max_retries=2, flush_interval_s=1, expected_batch_turnaround_s=30)
    record = _record(deadline_at=2000.0)
    v = flex_verdict(record, settings, retries_so_far=2, backoff_s=0.1, relayed_anything=False,
                     may_batch=True, now=1001.0)
    assert v.action == "batch" and "batch" in v.reason
    for relayed, may_batch in ((True, True), (False, False)):
        v = flex_verdict(record, settings, retries_so_far=2, backoff_s=0.1,
                         relayed_anything=relayed, may_batch=may_batch, now=1001.0)
        assert v.action == "standard"


def test_flex_verdict_uses_the_priority_default_deadline() -> None:
    settings = s(flex_max_retries=0, deadline_normal_s=100, flush_interval_s=1,
                 expected_batch_turnaround_s=30)
    v = flex_verdict(_record(), settings, retries_so_far=0, backoff_s=0.1,
                     relayed_anything=False, may_batch=True, now=1001.0)
    assert v.action == "batch"  # 99 s left, a 31 s round trip fits
    v = flex_verdict(_record(), settings, retries_so_far=0, backoff_s=0.1,
                     relayed_anything=False, may_batch=True, now=1080.0)
    assert v.action == "standard"


def _status_error(status: int, body: dict[str, Any]) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")
    response = httpx.Response(status, json=body, request=request)
    cls = openai.BadRequestError if status == 400 else openai.RateLimitError
    return cls("refused", response=response, body=body)


def test_refusals_are_told_apart() -> None:
    flex_400 = _status_error(400, {"error": {"message": "Invalid value for 'service_tier': flex "
                                             "is not available", "param": "service_tier"}})
    other_400 = _status_error(400, {"error": {"message": "bad max_tokens", "param": "max_tokens"}})
    busy = _status_error(429, {"error": {"message": "Resource Unavailable",
                                         "code": "resource_unavailable"}})
    assert is_flex_refusal(flex_400) and not is_flex_refusal(other_400)
    assert not is_flex_refusal(busy) and is_resource_unavailable(busy)
    assert not is_resource_unavailable(flex_400)


def test_tier_prices_and_costs_are_exact() -> None:
    settings = s()
    usage = {"prompt_tokens": 1_000_000, "completion_tokens": 1_000_000}
    assert cost_usd(settings, FLEX, usage, "flex", tier="flex") == Decimal("1.125")
    assert cost_usd(settings, FLEX, usage, "stream", tier="priority") == Decimal("4.05")
    assert cost_usd(settings, FLEX, usage, "stream", tier="default") == Decimal("2.25")
    assert cost_usd(settings, FLEX, usage, "batch") == Decimal("1.125")
    # A tier the table does not list is derived: flex at the batch discount, priority at 2x.
    assert tier_rates(settings, PLAIN, "flex") == (Decimal("0.075"), Decimal("0.300"))
    assert tier_rates(settings, "gpt-5-nano", "priority") == (Decimal("0.10"), Decimal("0.80"))
    one = {"prompt_tokens": 7, "completion_tokens": 3}
    assert cost_usd(settings, "gpt-5-nano", one, "flex", tier="flex") == \
        Decimal("0.000000775000")


def test_billing_follows_the_reported_tier() -> None:
    assert served_tier("flex", "flex") == "flex"
    assert served_tier("default", "flex") == "default"
    assert served_tier(None, "flex") == "default"
    assert served_tier("auto", "priority") == "default"


def test_every_builtin_flex_or_priority_price_is_complete() -> None:
    for model, price in DEFAULT_PRICES.items():
        assert (price.flex_input_per_mtok is None) == (price.flex_output_per_mtok is None), model
    with pytest.raises(ValueError, match="go together"):
        Settings(_env_file=None, prices={"m": {"input_per_mtok": 1, "output_per_mtok": 1,
                                               "flex_input_per_mtok": 1}})


def test_ledger_lines_are_per_lane_and_tier_and_read_old_fields() -> None:
    settings = s()
    usage = {"prompt_tokens": 10, "completion_tokens": 20}
    raw: dict[str, int] = {}
    for route, tier in (("flex", "flex"), ("stream", "priority"), ("batch", None)):
        for name, amount in ledger_increments(settings, route, FLEX, usage, tier=tier)[1].items():
            raw[name] = raw.get(name, 0) + amount
    raw["stream|gpt-4o-mini|requests"] = 2  # a field written before tiers
    ledger = Ledger.from_hash(raw)
    assert set(ledger.lines) == {("flex", "flex", FLEX), ("stream", "priority", FLEX),
                                 ("batch", "batch", FLEX), ("stream", "default", PLAIN)}
    assert ledger.total(tier="priority").savings_usd < 0 < ledger.total("flex").savings_usd
    assert ledger.total("flex").savings_usd == ledger.total("batch").savings_usd
    view = ledger.as_dict()
    assert {row["tier"] for row in view["by_lane_tier_model"]} == {"flex", "priority", "batch",
                                                                   "default"}
    assert view["by_tier"]["default"]["requests"] == 2
