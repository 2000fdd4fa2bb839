"""The classifier: which lane a request takes, and why (the reason is stored on the record)."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid_router.router.core.records import Priority, RouteName
from hybrid_router.settings import Settings


@dataclass(frozen=True)
class RouteDecision:
    route: RouteName
    reason: str


def classify(
    priority: Priority,
    deadline_s: float | None,
    settings: Settings,
    flush_interval_s: float | None = None,
) -> RouteDecision:
    """Route by explicit priority; a deadline shorter than a batch round trip goes to stream.

    The expected batch round trip is one flush interval of waiting plus the expected batch
    turnaround. `flush_interval_s` is the runtime value when it was changed without a restart.
    """
    if priority == "high":
        return RouteDecision("stream", "priority high streams at once")
    if priority == "normal":
        preferred: RouteName = settings.normal_route
        reason = f"priority normal routes to {preferred} (ROUTER_NORMAL_ROUTE)"
    else:
        preferred = "batch"
        reason = "priority low waits for the next batch flush"
    if preferred == "batch" and deadline_s is not None:
        interval = flush_interval_s if flush_interval_s is not None else settings.flush_interval_s
        expected = interval + settings.expected_batch_turnaround_s
        if deadline_s < expected:
            return RouteDecision(
                "stream",
                f"deadline {deadline_s:g}s is shorter than the expected batch round trip "
                f"{expected:g}s (flush interval + turnaround), so it streams",
            )
    return RouteDecision(preferred, reason)


def deadline_depends_on_flush(priority: Priority, deadline_s: float | None, settings: Settings) -> bool:
    """Whether routing needs the flush interval (which may have changed at runtime): only a
    request with a deadline that would otherwise go to the batch lane. Callers read the runtime
    value from Redis just in that case."""
    bound_for_batch = priority == "low" or (priority == "normal" and settings.normal_route == "batch")
    return deadline_s is not None and bound_for_batch
