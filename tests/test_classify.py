"""The classifier: explicit priority, `normal` as configured, deadlines shorter than a batch
round trip go to the stream lane; the reason says why."""

from __future__ import annotations

from typing import Any

from hybrid_router.router.core.lanes import LaneDecision, choose_lane
from hybrid_router.settings import Settings


def classify(priority: Any, deadline_s: float | None, settings: Settings,
             flush_interval_s: float | None = None) -> LaneDecision:
    """The lane of a request for the default model."""
    return choose_lane(priority, deadline_s, settings.default_model, settings,
                       flush_interval_s=flush_interval_s)


def s(**values: Any) -> Settings:
    return Settings(_env_file=None, flush_interval_s=60, expected_batch_turnaround_s=3600,
                    **values)


def test_high_streams() -> None:
    d = classify("high", None, s())
    assert d.route == "stream" and "high" in d.reason


def test_normal_defaults_to_stream_and_follows_settings() -> None:
    assert classify("normal", None, s()).route == "stream"
    d = classify("normal", None, s(normal_route="batch"))
    assert d.route == "batch" and "ROUTER_NORMAL_ROUTE" in d.reason


def test_low_batches() -> None:
    d = classify("low", None, s())
    assert d.route == "batch" and "flush" in d.reason


def test_short_deadline_sends_low_to_stream() -> None:
    d = classify("low", 600, s())
    assert d.route == "stream"
    assert "600" in d.reason and "3660" in d.reason


def test_deadline_longer_than_round_trip_stays_batch() -> None:
    assert classify("low", 3661, s()).route == "batch"
    assert classify("low", 3659, s()).route == "stream"


def test_runtime_flush_interval_counts() -> None:
    assert classify("low", 4000, s(), flush_interval_s=600).route == "stream"


def test_deadline_applies_to_normal_routed_to_batch_and_never_slows_high() -> None:
    assert classify("normal", 10, s(normal_route="batch")).route == "stream"
    assert classify("high", 10**9, s()).route == "stream"


def test_flush_interval_is_only_needed_for_deadlines_bound_for_batch() -> None:
    from hybrid_router.router.core.lanes import deadline_depends_on_flush

    assert deadline_depends_on_flush("low", 10, s())
    assert not deadline_depends_on_flush("low", None, s())
    assert not deadline_depends_on_flush("high", 10, s())
    assert not deadline_depends_on_flush("normal", 10, s())
    assert deadline_depends_on_flush("normal", 10, s(normal_route="batch"))
