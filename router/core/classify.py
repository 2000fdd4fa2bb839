"""The classifier's historical interface: `hybrid_router.router.core.lanes.choose_lane` for the default model.

Kept for callers that route by priority and deadline alone; `hybrid_router.router.core.lanes` holds the rules."""

from __future__ import annotations

from hybrid_router.router.core.lanes import LaneDecision, choose_lane, considers_batch
from hybrid_router.router.core.records import Priority
from hybrid_router.settings import Settings

RouteDecision = LaneDecision


def classify(
    priority: Priority,
    deadline_s: float | None,
    settings: Settings,
    flush_interval_s: float | None = None,
) -> LaneDecision:
    """The lane of a request for the default model (see `hybrid_router.router.core.lanes.choose_lane`)."""
    return choose_lane(priority, deadline_s, settings.default_model, settings,
                       flush_interval_s=flush_interval_s)


def deadline_depends_on_flush(priority: Priority, deadline_s: float | None, settings: Settings) -> bool:
    """Whether routing needs the flush interval (which may have changed at runtime): only a
    request with a deadline that would otherwise go to the batch lane. Callers read the runtime
    value from Redis just in that case."""
    return deadline_s is not None and considers_batch(priority, settings)
