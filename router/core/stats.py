"""One snapshot of the router's state, read from Redis: behind `/metrics`, `/v1/stats` and `status`.

Everything is read at the moment it is asked for, so any number of API replicas and worker
processes need no shared in-process registry: Redis is the registry. The queries are written
once as a *plan* (a generator that yields rounds of Redis commands and receives their replies)
and run by a sync driver (CLI) or an async one (API), each round in one pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.endpoints import split_queue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lane_facts import expected_view
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.metrics import TIMING_METRICS, Histogram, histograms_from_hash
from hybrid_router.router.core.redis_plan import Command, arun_plan, run_plan
from hybrid_router.router.core.redis_plan import Plan as PlanOf
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.runtime_config import BeatReport, FlushInterval, flush_interval_from
from hybrid_router.settings import OTHER_MODEL, Settings

LANES = ("stream", "batch")  # the queues: flex requests wait in the stream engine's
TIMING_LANES = ("stream", "flex", "batch")  # latency histograms, one per lane
# kombu's Redis transport keeps a queue's prioritised messages under `<queue>\x06\x16<step>`.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)
# Looking up the model of each stream request is one HGET per id: bounded so a flood cannot
# make a scrape slow. Ids beyond the bound are counted under model "other". Every model is
# reported by `Settings.model_label` (the operator's models, else "other"): tenants pick model
# names, so they must not become label values (unbounded series, and a leak on /metrics).
STREAM_MODEL_LOOKUP_LIMIT = 1000

Plan = PlanOf["Snapshot"]


@dataclass
class QueueDepth:
    lane: str
    model: str
    state: str
    count: int


@dataclass
class Snapshot:
    """What the router holds right now (counts, ages, batches, ledger, latency histograms)."""

    taken_at: float
    queues: list[QueueDepth] = field(default_factory=list)
    celery_queues: dict[str, int] = field(default_factory=dict)
    oldest_age_s: dict[str, float] = field(default_factory=dict)  # lane -> seconds (0 = empty)
    batches_in_flight: dict[str, int] = field(default_factory=dict)  # upstream status -> count
    batch_ids_in_flight: list[str] = field(default_factory=list)
    ledger: Ledger = field(default_factory=Ledger)
    timings: dict[str, dict[str, Histogram]] = field(default_factory=dict)  # lane -> metric -> h
    flush_interval_s: float = 0.0  # in force now (runtime override, else Settings)
    flush_interval: FlushInterval | None = None  # the same, with where it comes from
    beat: BeatReport | None = None  # beat's own report (None: no beat has reported)
    last_flush: dict[str, str] = field(default_factory=dict)  # Keys.last_flush() as written
    # Every model label the operator named, and `other`: /metrics reports a zero for each
    # lane x state x label that has nothing, so a dashboard tells zero from missing.
    model_labels: list[str] = field(default_factory=lambda: [OTHER_MODEL])
    # The lanes' rolling expected latencies (`hybrid_router.router.core.lane_facts`), with the settings' starting
    # values for lanes and models not measured yet.
    expected_latency: list[dict[str, Any]] = field(default_factory=list)
    expected_defaults: dict[str, float] = field(default_factory=dict)
    flex_refused: dict[str, float] = field(default_factory=dict)  # model -> until (epoch s)

    def depth(self, lane: str) -> int:
        return sum(q.count for q in self.queues if q.lane == lane)

    def last_flush_view(self) -> dict[str, Any]:
        """`Keys.last_flush()` with numbers as JSON numbers (null / 0 before the first flush)."""
        raw = self.last_flush

        def number(name: str) -> int:
            try:
                return int(raw.get(name) or 0)
            except ValueError:
                return 0

        try:
            at = float(raw["at"]) if raw.get("at") else None
        except ValueError:
            at = None
        return {"at": at, "flush_id": raw.get("flush_id") or None,
                "submitted": number("submitted"), "batches": number("batches"),
                "error": raw.get("error") or None}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: counts and times are numbers; money is an exact decimal string in
        plain notation with 12 decimals (`hybrid_router.router.core.pricing.money_text`)."""
        return {
            "taken_at": self.taken_at,
            "queues": {
                lane: {
                    "total": self.depth(lane),
                    "oldest_age_s": round(self.oldest_age_s.get(lane, 0.0), 3),
                    "by_model": [
                        {"model": q.model, "state": q.state, "count": q.count}
                        for q in self.queues if q.lane == lane
                    ],
                }
                for lane in LANES
            },
            "celery_queues": self.celery_queues,
            "flush_interval_s": self.flush_interval_s,
            "flush_interval": self.flush_interval.as_dict() if self.flush_interval else None,
            "beat": self.beat.as_dict(self.taken_at) if self.beat is not None else None,
            "last_flush": self.last_flush_view(),
            "batches_in_flight": {
                "total": len(self.batch_ids_in_flight),
                "by_status": self.batches_in_flight,
            },
            "ledger": self.ledger.as_dict(),
            "latency": {
                lane: {name: hist.summary() for name, hist in metrics.items()}
                for lane, metrics in self.timings.items()
            },
            "expected_latency": {
                "measured": self.expected_latency,
                "starting_values_s": self.expected_defaults,
                "flex_refused_until": {m: until for m, until in sorted(self.flex_refused.items())
                                       if until > self.taken_at},
            },
        }


def celery_queue_keys(keys: Keys, queue: str) -> list[str]:
    """The Redis lists kombu keeps one Celery queue in (plain and per priority step)."""
    base = keys.celery_prefix() + queue
    return [base] + [f"{base}{_KOMBU_PRIORITY_SEP}{step}" for step in _KOMBU_PRIORITY_STEPS]


def snapshot_plan(settings: Settings) -> Plan:
    """The queries behind a `Snapshot`, in three rounds (each round is one pipeline)."""
    keys = Keys(settings.key_prefix)
    queue_names = {"stream": keys.stream_queue(), "batch": keys.batch_queue()}
    # Round 1: what exists.
    round1: list[Command] = [
        ("smembers", (keys.pending_models(),)),
        ("zrange", (keys.batches_in_flight(), 0, -1)),
        ("zrange", (keys.dispatched(), 0, STREAM_MODEL_LOOKUP_LIMIT - 1, False, True)),
        ("zcard", (keys.dispatched(),)),
        ("zrange", (keys.streaming(), 0, STREAM_MODEL_LOOKUP_LIMIT - 1)),
        ("zcard", (keys.streaming(),)),
        ("hgetall", (keys.ledger(),)),
        *[("hgetall", (keys.timings(lane),)) for lane in TIMING_LANES],
        ("hgetall", (keys.runtime_config(),)),
        ("hgetall", (keys.beat(),)),
        ("hgetall", (keys.last_flush(),)),
        ("hgetall", (keys.lane_latency(),)),
        ("hgetall", (keys.flex_unsupported(),)),
    ]
    for queue in queue_names.values():
        round1 += [("llen", (name,)) for name in celery_queue_keys(keys, queue)]
    r1 = yield round1
    models = sorted(text(m) for m in r1[0])
    batch_ids = [text(b) for b in r1[1]]
    dispatched = [(text(i), float(score)) for i, score in r1[2]]
    n_dispatched, streaming, n_streaming = int(r1[3]), [text(i) for i in r1[4]], int(r1[5])
    ledger = Ledger.from_hash(r1[6]).relabelled(settings.model_label)
    n_lanes = len(TIMING_LANES)
    timings = {lane: histograms_from_hash(r1[7 + i]) for i, lane in enumerate(TIMING_LANES)}
    beat = BeatReport.from_hash(r1[8 + n_lanes])
    flush_interval = flush_interval_from(r1[7 + n_lanes], beat, settings)
    last_flush = {text(k): text(v) for k, v in r1[9 + n_lanes].items()}
    lane_latency, refused = r1[10 + n_lanes], r1[11 + n_lanes]
    lengths = r1[12 + n_lanes:]
    per_queue = len(_KOMBU_PRIORITY_STEPS) + 1
    celery_queues = {
        name: sum(int(n) for n in lengths[i * per_queue:(i + 1) * per_queue])
        for i, name in enumerate(queue_names.values())
    }

    # Round 2: per-model pending lengths and heads, batch statuses, stream request models.
    round2: list[Command] = []
    for model in models:
        round2 += [("llen", (keys.pending(model),)), ("lindex", (keys.pending(model), 0))]
    round2 += [("hget", (keys.batch(b), "status")) for b in batch_ids]
    stream_ids = [i for i, _ in dispatched] + streaming
    round2 += [("hget", (keys.record(i), "model")) for i in stream_ids]
    r2 = yield round2
    pending = {m: (int(r2[2 * i]), r2[2 * i + 1]) for i, m in enumerate(models)}
    offset = 2 * len(models)
    batch_status: dict[str, int] = {}
    for raw in r2[offset:offset + len(batch_ids)]:
        status = text(raw) if raw is not None else "unknown"
        batch_status[status] = batch_status.get(status, 0) + 1
    offset += len(batch_ids)
    stream_models = [text(m) if m is not None else "unknown" for m in r2[offset:]]

    # Round 3: when the oldest queued request of each model was created.
    heads = [(m, text(head)) for m, (_n, head) in pending.items() if head is not None]
    r3 = yield [("hget", (keys.record(rid), "created_at")) for _m, rid in heads]

    now = time.time()
    snap = Snapshot(taken_at=now, celery_queues=celery_queues, batches_in_flight=batch_status,
                    batch_ids_in_flight=batch_ids, ledger=ledger, timings=timings,
                    flush_interval_s=flush_interval.seconds, flush_interval=flush_interval,
                    beat=beat, last_flush=last_flush, model_labels=model_labels(settings),
                    expected_latency=expected_view(lane_latency),
                    expected_defaults={
                        "stream": settings.expected_stream_latency_s,
                        "flex": settings.expected_flex_latency_s,
                        "batch": flush_interval.seconds + settings.expected_batch_turnaround_s},
                    flex_refused={text(k): float(text(v)) for k, v in refused.items()})
    queued: dict[str, int] = {}
    for queue, (count, _head) in pending.items():
        if count:  # a queue per endpoint and model: counted by model
            label = settings.model_label(split_queue(queue)[1])
            queued[label] = queued.get(label, 0) + count
    snap.queues += [QueueDepth("batch", m, "queued", n) for m, n in sorted(queued.items())]
    created = [float(text(c)) for c in r3 if c is not None]
    snap.oldest_age_s["batch"] = max((now - c for c in created), default=0.0)
    snap.oldest_age_s["stream"] = max(now - dispatched[0][1], 0.0) if dispatched else 0.0
    for state, ids_models, total in (
        ("dispatched", stream_models[:len(dispatched)], n_dispatched),
        ("streaming", stream_models[len(dispatched):], n_streaming),
    ):
        by_model: dict[str, int] = {}
        for model in ids_models:
            label = settings.model_label(model)
            by_model[label] = by_model.get(label, 0) + 1
        if total > len(ids_models):
            by_model[OTHER_MODEL] = by_model.get(OTHER_MODEL, 0) + total - len(ids_models)
        snap.queues += [QueueDepth("stream", m, state, n) for m, n in sorted(by_model.items())]
    return snap


def model_labels(settings: Settings) -> list[str]:
    """The models the operator named (price table and allowed list, not `*`), and `other`."""
    named = {m for m in (*settings.prices, *settings.allowed_models) if m != "*"}
    return [*sorted(named), OTHER_MODEL]


def take_snapshot(client: redis.Redis, settings: Settings) -> Snapshot:
    """Run the snapshot plan on a sync client (CLI `status`)."""
    return run_plan(client, snapshot_plan(settings))


async def take_snapshot_async(client: aioredis.Redis, settings: Settings) -> Snapshot:
    """Run the snapshot plan on an async client (the API's `/metrics` and `/v1/stats`)."""
    return await arun_plan(client, snapshot_plan(settings))


__all__ = ["TIMING_METRICS", "QueueDepth", "Snapshot", "take_snapshot", "take_snapshot_async"]
