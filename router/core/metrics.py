"""Prometheus metrics of the router, collected from Redis at scrape time.

Why Redis and not a process-local registry: the API, the stream workers and the batch workers
are separate processes (often on separate hosts). Counters that only exist in one process would
need prometheus' multiprocess mode and still miss the other hosts. So:

* queue depths, ages, batches in flight and the cost ledger are *read* from the keys the lanes
  already maintain (`hybrid_router.router.core.stats`);
* latency histograms are *pushed* by whoever finishes a request: `observe_finished()` adds one
  observation to a Redis hash per lane (`Keys.timings(lane)`) with HINCRBY — exact across any
  number of processes, constant memory (one field per bucket), never reset except by deleting
  the key. The collector turns it into Prometheus histograms.

`RouterCollector` is a custom collector over one `Snapshot`; the `/metrics` route builds a fresh
registry per scrape, so nothing is cached between scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.router.core.redis_text import text

if TYPE_CHECKING:
    from hybrid_router.router.core.stats import Snapshot

# Upper bounds (seconds). Streams answer in well under a second to minutes; batches in minutes
# to a day, so one set of buckets spans both lanes.
BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 21600.0, 86400.0,
)
TIMING_METRICS = ("ttft", "e2e")
# States of each lane's queue depth, all reported (zeros included).
QUEUE_STATES: dict[str, tuple[str, ...]] = {"batch": ("queued",),
                                             "stream": ("dispatched", "streaming")}
# The Batch API's statuses of a batch not finished yet, all reported (zeros included).
BATCH_STATUSES_IN_FLIGHT = ("validating", "in_progress", "finalizing", "cancelling")
_MICRO = 1_000_000


@dataclass
class Histogram:
    """Bucket counts (not cumulative; the last one is +Inf), sum and count of one metric."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum_s: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*[str(b) for b in BUCKETS], "+Inf"), self.buckets, strict=True):
            running += n
            out.append((bound, float(running)))
        return out

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (coarse, for the CLI and JSON)."""
        if not self.count:
            return None
        target, running = q * self.count, 0
        for bound, n in zip((*BUCKETS, float("inf")), self.buckets, strict=True):
            running += n
            if running >= target:
                return bound
        return float("inf")

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_s": round(self.sum_s / self.count, 4) if self.count else None,
            "p50_le_s": self.quantile(0.5),
            "p95_le_s": self.quantile(0.95),
        }


def _bucket_index(seconds: float) -> int:
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS)


def timing_observations(record: RequestRecord) -> dict[str, float]:
    """The latencies one finished request contributes: end to end, and time to first token.

    Time to first token is when the first content reached the router: the first streamed token
    on the stream lane; on the batch lane the whole answer arrives at once, so it is the
    finish time. Requests that never produced content (failed, cancelled) only count end to end.
    """
    out: dict[str, float] = {}
    if record.finished_at is None:
        return out
    out["e2e"] = max(record.finished_at - record.created_at, 0.0)
    first = record.first_token_at
    if first is None and record.route == "batch" and record.status == "completed":
        first = record.finished_at
    if first is not None:
        out["ttft"] = max(first - record.created_at, 0.0)
    return out


def timing_increments(record: RequestRecord) -> dict[str, int]:
    """HINCRBY fields for `Keys.timings(record.route)`: ``<metric>|b|<i>``, ``|sum_us``, ``|n``."""
    incs: dict[str, int] = {}
    for metric, seconds in timing_observations(record).items():
        incs[f"{metric}|b|{_bucket_index(seconds)}"] = 1
        incs[f"{metric}|sum_us"] = int(seconds * _MICRO)
        incs[f"{metric}|n"] = 1
    return incs


def queue_timing(pipe: Any, keys: Keys, record: RequestRecord) -> None:
    """Queue the observation of a finished request on a (sync or async) pipeline or client.

    Call once per request, right after the transition to its terminal state succeeded
    (`TransitionOutcome.moved`), so a duplicate delivery does not count twice.
    """
    for name, amount in timing_increments(record).items():
        pipe.hincrby(keys.timings(record.route), name, amount)


def observe_finished(client: Any, keys: Keys, record: RequestRecord) -> None:
    """Record a finished request's latencies (sync client; one round trip)."""
    pipe = client.pipeline(transaction=False)
    queue_timing(pipe, keys, record)
    pipe.execute()


def histograms_from_hash(raw: dict[Any, Any]) -> dict[str, Histogram]:
    """Parse a `Keys.timings(lane)` hash into one `Histogram` per metric."""
    hists = {name: Histogram() for name in TIMING_METRICS}
    for key, value in raw.items():
        name = text(key)
        metric, _, rest = name.partition("|")
        hist = hists.get(metric)
        if hist is None:
            continue
        amount = int(value)
        if rest == "n":
            hist.count = amount
        elif rest == "sum_us":
            hist.sum_s = amount / _MICRO
        elif rest.startswith("b|"):
            index = int(rest[2:])
            if 0 <= index < len(hist.buckets):
                hist.buckets[index] = amount
    return hists


class RouterCollector(Collector):
    """Prometheus view of one `Snapshot` (built per scrape from Redis)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        depth = GaugeMetricFamily(
            "hybrid_router_queue_depth",
            "Requests waiting or running, by lane, model and state (batch: queued for the next "
            "flush; stream: dispatched to or streaming in a worker).",
            labels=["lane", "model", "state"],
        )
        counts = {(q.lane, q.model, q.state): q.count for q in snap.queues}
        for lane, states in QUEUE_STATES.items():  # zeros too: a dashboard tells 0 from missing
            for state in states:
                for model in snap.model_labels:
                    counts.setdefault((lane, model, state), 0)
        for (lane, model, state), count in sorted(counts.items()):
            depth.add_metric([lane, model, state], count)
        yield depth

        celery = GaugeMetricFamily("hybrid_router_celery_queue_length",
                                   "Messages waiting in each Celery queue.", labels=["queue"])
        for name, count in snap.celery_queues.items():
            celery.add_metric([name], count)
        yield celery

        age = GaugeMetricFamily("hybrid_router_oldest_queued_age_seconds",
                                "Age of the oldest request not yet started, by lane.",
                                labels=["lane"])
        for lane, seconds in snap.oldest_age_s.items():
            age.add_metric([lane], seconds)
        yield age

        batches = GaugeMetricFamily("hybrid_router_batches_in_flight",
                                    "Upstream batches submitted and not yet finished, by status.",
                                    labels=["status"])
        in_flight = {status: 0 for status in BATCH_STATUSES_IN_FLIGHT}
        in_flight.update(snap.batches_in_flight)
        for status, count in sorted(in_flight.items()):
            batches.add_metric([status], count)
        yield batches

        yield GaugeMetricFamily("hybrid_router_flush_interval_seconds",
                                "Seconds between batch flushes now in force (runtime override "
                                "or ROUTER_FLUSH_INTERVAL_S).", value=snap.flush_interval_s)
        overridden = snap.flush_interval is not None and snap.flush_interval.overridden
        yield GaugeMetricFamily("hybrid_router_flush_interval_overridden",
                                "1 while a run-time override (`config set flush-interval`) is "
                                "in force, 0 when ROUTER_FLUSH_INTERVAL_S applies.",
                                value=1.0 if overridden else 0.0)
        yield GaugeMetricFamily("hybrid_router_last_flush_timestamp_seconds",
                                "When the last batch flush ran (Unix time; 0 = never).",
                                value=snap.last_flush_view()["at"] or 0.0)
        beat_at = snap.beat.at if snap.beat is not None else None
        yield GaugeMetricFamily("hybrid_router_beat_last_tick_timestamp_seconds",
                                "When beat last ticked (Unix time; 0 = no beat has reported). "
                                "Alert when it falls behind: beat is down.",
                                value=beat_at or 0.0)

        yield from self._ledger()
        yield from self._timings()

    def _ledger(self) -> Iterator[Metric]:
        lines = sorted(self.snapshot.ledger.lines.items())
        labels = ["route", "tier", "model"]
        families = {
            "requests": CounterMetricFamily("hybrid_router_finished_requests",
                                            "Requests with a result, by lane (route), the tier "
                                            "that served them and model.", labels=labels),
            "tokens": CounterMetricFamily("hybrid_router_tokens",
                                          "Tokens relayed (completion) and sent (prompt).",
                                          labels=[*labels, "kind"]),
            "cost": CounterMetricFamily("hybrid_router_cost_usd",
                                        "What the upstream charged, in USD.", labels=labels),
            "standard": CounterMetricFamily("hybrid_router_standard_cost_usd",
                                            "What the same tokens cost at the standard price.",
                                            labels=labels),
            "savings": CounterMetricFamily("hybrid_router_savings_usd",
                                           "Standard price minus what was paid (batch and flex "
                                           "discounts; negative at the priority tier).",
                                           labels=labels),
        }
        for (route, tier, model), line in lines:
            key = [route, tier, model]
            families["requests"].add_metric(key, line.requests)
            families["tokens"].add_metric([*key, "prompt"], line.prompt_tokens)
            families["tokens"].add_metric([*key, "completion"], line.completion_tokens)
            families["cost"].add_metric(key, float(line.cost_usd))
            families["standard"].add_metric(key, float(line.standard_cost_usd))
            families["savings"].add_metric(key, float(line.savings_usd))
        yield from families.values()

    def _timings(self) -> Iterator[Metric]:
        names = {
            "ttft": ("hybrid_router_time_to_first_token_seconds",
                     "From acceptance to the first content reaching the router, by lane."),
            "e2e": ("hybrid_router_request_duration_seconds",
                    "From acceptance to the terminal state, by lane."),
        }
        for metric, (name, doc) in names.items():
            family = HistogramMetricFamily(name, doc, labels=["lane"])
            for lane, hists in sorted(self.snapshot.timings.items()):
                hist = hists[metric]
                family.add_metric([lane], hist.cumulative(), sum_value=hist.sum_s)
            yield family
