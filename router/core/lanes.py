"""Which lane and tier a request takes: the cheapest that is expected to meet its deadline.

A pure function over the request, the settings and what the lanes have measured
(`hybrid_router.router.core.lane_facts.LaneFacts`), so any endpoint (chat completions today, others later) can
call it the same way. Lanes, cheapest first:

- ``batch``: a Batch API job; expected to finish in one flush interval + the batch turnaround;
- ``flex``: a plain streamed call with ``service_tier=flex`` (batch prices, slower, may answer
  429); only for models with a flex price that the upstream has not refused at flex;
- ``stream``: a plain streamed call at the standard tier (``priority`` for high where
  configured).

``high`` always streams at once. ``normal`` and ``low`` get the first lane whose expected
latency fits their deadline (their own ``deadline_s``, else the priority's default), where
``normal`` considers the batch lane only when ``ROUTER_NORMAL_ROUTE=batch``. A client's own
``service_tier`` is honoured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybrid_router.router.core.records import Priority, RouteName
from hybrid_router.settings import Settings

# The tiers a client may ask for with ``service_tier`` (OpenAI's names; ``auto`` = let the
# router choose).
CLIENT_TIERS = ("auto", "default", "flex", "priority")


@dataclass(frozen=True)
class LaneFacts:
    """What the lanes have measured: rolling expected latency per (lane, model label), and the
    models the upstream refused at the flex tier (until when)."""

    expected_s: dict[tuple[str, str], float] = field(default_factory=dict)
    flex_refused_until: dict[str, float] = field(default_factory=dict)

    def expected(self, settings: Settings, lane: str, model: str) -> float:
        """The lane's expected latency for `model`: the rolling figure, else the setting."""
        learned = self.expected_s.get((lane, settings.model_label(model)))
        if learned is not None:
            return learned
        if lane == "flex":
            return settings.expected_flex_latency_s
        return settings.expected_stream_latency_s

    def flex_refused(self, model: str, now: float) -> bool:
        until = self.flex_refused_until.get(model)
        return until is not None and until > now


NO_FACTS = LaneFacts()


@dataclass(frozen=True)
class LaneDecision:
    route: RouteName
    reason: str
    tier: str | None  # asked of the upstream: "default", "flex", "priority"; None for batch
    expected_latency_s: float | None = None


def batch_round_trip_s(settings: Settings, flush_interval_s: float | None) -> float:
    interval = flush_interval_s if flush_interval_s is not None else settings.flush_interval_s
    return interval + settings.expected_batch_turnaround_s


def considers_batch(priority: Priority, settings: Settings) -> bool:
    """Whether a request of `priority` may go to the batch lane at all."""
    return priority == "low" or (priority == "normal" and settings.normal_route == "batch")


def choose_lane(
    priority: Priority,
    deadline_s: float | None,
    model: str,
    settings: Settings,
    *,
    facts: LaneFacts = NO_FACTS,
    now: float = 0.0,
    flush_interval_s: float | None = None,
    client_tier: str | None = None,
    batch_allowed: bool = True,
) -> LaneDecision:
    """The lane, the tier asked of the upstream, the reason and the expected latency judged on.

    `client_tier`: the ``service_tier`` the client sent (honoured; ``auto`` lets the router
    choose). `batch_allowed`: False where the answer must come back on the same call (the
    drop-in). `now`: epoch seconds, for the expiry of remembered flex refusals.
    """
    if client_tier == "flex":
        return LaneDecision("flex", "service_tier flex asked by the client", "flex",
                            facts.expected(settings, "flex", model))
    if client_tier in ("default", "priority"):
        return LaneDecision("stream", f"service_tier {client_tier} asked by the client",
                            client_tier, facts.expected(settings, "stream", model))
    stream_expected = facts.expected(settings, "stream", model)
    if priority == "high":
        if settings.priority_tier_for(model):
            return LaneDecision("stream", "priority high streams at once, at the priority tier "
                                "(ROUTER_PRIORITY_TIER_MODELS)", "priority", stream_expected)
        return LaneDecision("stream", "priority high streams at once", "default",
                            stream_expected)
    given = deadline_s is not None
    deadline = deadline_s if deadline_s is not None else settings.deadline_for(priority)
    assert deadline is not None  # normal and low always have one
    said = f"deadline {deadline:g}s" + ("" if given else f" (the {priority} default)")
    notes: list[str] = []
    if batch_allowed and considers_batch(priority, settings):
        expected = batch_round_trip_s(settings, flush_interval_s)
        if expected <= deadline:
            why = ("priority low waits for the next batch flush" if priority == "low" else
                   "priority normal routes to batch (ROUTER_NORMAL_ROUTE)")
            return LaneDecision("batch", f"{why}; {said} allows the expected batch round trip "
                                f"{expected:g}s", None, expected)
        notes.append(f"is shorter than the expected batch round trip {expected:g}s (flush "
                     "interval + turnaround)")
    if settings.flex and settings.flex_priced(model):
        if facts.flex_refused(model, now):
            notes.append("cannot use flex: the upstream refused flex for this model lately")
        else:
            expected = facts.expected(settings, "flex", model)
            if expected <= deadline:
                head = f"{said} " + "; ".join(notes) + ", so " if notes else ""
                return LaneDecision("flex", f"{head}flex (batch price) is expected to answer in "
                                    f"{expected:g}s, within {said}", "flex", expected)
            notes.append(f"is shorter than flex's expected {expected:g}s")
    if notes:
        return LaneDecision("stream", f"{said} " + "; ".join(notes) + ", so it streams",
                            "default", stream_expected)
    return LaneDecision("stream", f"priority {priority} routes to stream", "default",
                        stream_expected)


def deadline_depends_on_flush(priority: Priority, deadline_s: float | None, settings: Settings) -> bool:
    """Whether routing needs the flush interval (which may have changed at runtime): only a
    request with a deadline that would otherwise go to the batch lane. Callers read the runtime
    value from Redis just in that case."""
    return deadline_s is not None and considers_batch(priority, settings)
