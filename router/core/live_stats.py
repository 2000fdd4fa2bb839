"""The operator's live view (`/v1/stats` → ``live``, shown by ``GET /ui``): what the snapshot of
`hybrid_router.router.core.stats` does not say.

- **Batches in flight**, one by one: model, status, progress (requests done / failed / total, as
  the last poll saw the upstream's counts) and age.
- **The flush**: interval in force and its source (run-time override or the setting, with when
  and by whom it was set where that was recorded), the last flush and when the next is due.
- **Streams per worker**: each stream engine's heartbeat carries its host, pid, running
  streams and capacity (`hybrid_router.workers.stream.engine`), so this is one GET per live engine.
- **Time to first token over the last minutes**, per lane, and **cost and savings today**.
  Both come from *checkpoints*: copies of the cumulative hashes (`Keys.timings`,
  `Keys.ledger`) taken by whoever reads this view, at most one per minute (timings) and one
  per UTC day (ledger), each with a TTL. The figure is the cumulative one minus the oldest
  checkpoint inside the window, and the view says since when it counts (`since`): exact
  counts, nothing added to the write path of a request. The first reader of a day or of a
  quiet spell starts the window, so a view nobody looked at for a while counts from then.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.metrics import Histogram, histograms_from_hash
from hybrid_router.router.core.redis_plan import Command, arun_plan, run_plan
from hybrid_router.router.core.redis_plan import Plan as PlanOf
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.runtime_config import FLUSH_INTERVAL, validate_flush_interval
from hybrid_router.settings import Settings

LANES = ("stream", "flex", "batch")
TTFT_WINDOW_MIN = 5  # "the last minutes": the TTFT figures cover up to this many minutes
BATCHES_SHOWN = 100  # batches in flight listed one by one (the total is always exact)
ENGINES_SHOWN = 200
CHECKPOINT_AT = "_at"  # field of a checkpoint: when it was taken
# Where `PUT /v1/admin/config` / `config set` record who changed the interval, when they do.
SET_AT, SET_BY = "flush_interval_set_at", "flush_interval_set_by"

# KEYS: the cumulative hash, its checkpoint   ARGV: TTL seconds, now
# Copy the hash (with the time) unless this checkpoint exists; return the checkpoint. Copied
# 500 fields at a time (unpack has a limit on how many values it returns).
CHECKPOINT = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 1000 do
    redis.call('HSET', KEYS[2], unpack(all, i, math.min(i + 999, #all)))
  end
  redis.call('HSET', KEYS[2], '_at', ARGV[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
end
return redis.call('HGETALL', KEYS[2])
"""

Plan = PlanOf["LiveView"]


def _pairs(raw: Any) -> dict[str, str]:
    """A hash reply (dict, or the flat list a script returns) as text."""
    if isinstance(raw, dict):
        return {text(k): text(v) for k, v in raw.items()}
    items = list(raw or [])
    return {text(items[i]): text(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _money(amount: Decimal) -> str:
    return f"{amount:.6f}"


@dataclass
class LiveView:
    taken_at: float
    batches: list[dict[str, Any]] = field(default_factory=list)
    batches_total: int = 0
    flush: dict[str, Any] = field(default_factory=dict)
    engines: list[dict[str, Any]] = field(default_factory=list)
    ttft: dict[str, dict[str, Any]] = field(default_factory=dict)
    today: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "batches_in_flight": {"total": self.batches_total, "batches": self.batches},
            "flush": self.flush,
            "stream_workers": {
                "engines": self.engines,
                "running": sum(e["running"] for e in self.engines),
            },
            "ttft_recent": self.ttft,
            "today": self.today,
        }


def _ttft_view(now: float, current: dict[str, str], checkpoint: dict[str, str] | None
               ) -> dict[str, Any]:
    """TTFT of the requests finished since `checkpoint` (all of them when there is none)."""
    cur = histograms_from_hash(current)["ttft"]
    since = None
    if checkpoint is not None:
        since = _num(checkpoint.pop(CHECKPOINT_AT, None))
        old = histograms_from_hash(checkpoint)["ttft"]
        cur = Histogram(buckets=[a - b for a, b in zip(cur.buckets, old.buckets, strict=True)],
                        sum_s=cur.sum_s - old.sum_s, count=cur.count - old.count)
    return {
        "since": since,
        "window_s": round(now - since, 1) if since is not None else None,
        "count": cur.count,
        "mean_s": round(cur.sum_s / cur.count, 4) if cur.count else None,
        "p50_le_s": cur.quantile(0.5),
        "p99_le_s": cur.quantile(0.99),
    }


def live_plan(settings: Settings, now: float | None = None) -> Plan:
    """The queries behind a `LiveView`, in two rounds (each one pipeline)."""
    keys = Keys(settings.key_prefix)
    now = time.time() if now is None else now
    minute = int(now // 60)
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    ttl_minutes = (TTFT_WINDOW_MIN + 2) * 60
    round1: list[Command] = [
        ("zrange", (keys.batches_in_flight(), 0, BATCHES_SHOWN - 1, False, True)),
        ("zcard", (keys.batches_in_flight(),)),
        ("hgetall", (keys.runtime_config(),)),
        ("hgetall", (keys.last_flush(),)),
        ("srandmember", (keys.stream_engines(), ENGINES_SHOWN)),
        ("hgetall", (keys.ledger(),)),
        ("eval", (CHECKPOINT, 2, keys.ledger(), keys.ledger_checkpoint(day), 2 * 86400,
                  repr(now))),
    ]
    for lane in LANES:
        round1 += [
            ("hgetall", (keys.timings(lane),)),
            ("eval", (CHECKPOINT, 2, keys.timings(lane), keys.timings_checkpoint(lane, minute),
                      ttl_minutes, repr(now))),
            *[("hgetall", (keys.timings_checkpoint(lane, m),))
              for m in range(minute - TTFT_WINDOW_MIN, minute)],
        ]
    r1 = yield round1
    batch_rows = [(text(b), float(score)) for b, score in r1[0]]
    runtime, last_flush = _pairs(r1[2]), _pairs(r1[3])
    engine_ids = sorted(text(e) for e in r1[4] or [])
    ledger_now, ledger_then = _pairs(r1[5]), _pairs(r1[6])

    view = LiveView(taken_at=now, batches_total=int(r1[1]))
    offset = 7
    for lane in LANES:
        current = _pairs(r1[offset])
        checkpoints = [_pairs(r1[offset + 2 + i]) for i in range(TTFT_WINDOW_MIN)]
        checkpoints.append(_pairs(r1[offset + 1]))  # this minute's, taken just now if new
        oldest = next((c for c in checkpoints if c), None)
        view.ttft[lane] = _ttft_view(now, current, oldest)
        offset += 2 + TTFT_WINDOW_MIN

    view.flush = _flush_view(settings, runtime, last_flush)
    view.today = _today_view(settings, day, ledger_now, ledger_then)

    r2 = yield ([("hgetall", (keys.batch(b),)) for b, _ in batch_rows]
                + [("get", (keys.stream_engine_alive(e),)) for e in engine_ids])
    for (batch_id, submitted_at), raw in zip(batch_rows, r2[:len(batch_rows)], strict=True):
        meta = _pairs(raw)
        total = int(_num(meta.get("requests")) or 0)
        done, failed = int(_num(meta.get("done_count")) or 0), int(
            _num(meta.get("failed_count")) or 0)
        view.batches.append({
            "id": batch_id, "model": settings.model_label(meta.get("model") or ""),
            "mode": meta.get("mode") or None, "status": meta.get("status") or "unknown",
            "requests": total, "done": done, "failed": failed,
            "progress": round((done + failed) / total, 4) if total else 0.0,
            "submitted_at": submitted_at, "age_s": round(max(now - submitted_at, 0.0), 1),
        })
    for engine_id, raw in zip(engine_ids, r2[len(batch_rows):], strict=True):
        if raw is None:
            continue  # its heartbeat is gone: dead (its taken messages are handed back)
        try:
            beat = json.loads(text(raw))
        except ValueError:
            beat = {}
        if not isinstance(beat, dict):
            beat = {}
        view.engines.append({
            "engine": engine_id[:12], "host": str(beat.get("host") or "?"),
            "pid": beat.get("pid"), "running": int(beat.get("running") or 0),
            "capacity": beat.get("capacity"),
        })
    view.engines.sort(key=lambda e: (e["host"], str(e["pid"]), e["engine"]))
    return view


def _flush_view(settings: Settings, runtime: dict[str, str], last_flush: dict[str, str]
                ) -> dict[str, Any]:
    interval, source = settings.flush_interval_s, "setting"
    raw = runtime.get(FLUSH_INTERVAL)
    if raw is not None:
        with contextlib.suppress(ValueError):
            interval, source = validate_flush_interval(float(raw)), "override"
    last_at = _num(last_flush.get("at"))
    return {
        "interval_s": interval,
        "source": source,  # "override" (PUT /v1/admin/config, `config set`) or "setting"
        "setting_s": settings.flush_interval_s,
        "set_at": _num(runtime.get(SET_AT)) if source == "override" else None,
        "set_by": (runtime.get(SET_BY) or None) if source == "override" else None,
        "last_at": last_at,
        # Beat flushes once the interval has passed since the last flush and there is work
        # (hybrid_router.workers.batch.schedule): the next one is due then (null before the first flush).
        "next_due_at": last_at + interval if last_at is not None else None,
    }


def _today_view(settings: Settings, day: str, now_hash: dict[str, str],
                then_hash: dict[str, str]) -> dict[str, Any]:
    since = _num(then_hash.pop(CHECKPOINT_AT, None))
    now_ledger = Ledger.from_hash(now_hash).relabelled(settings.model_label)
    then_ledger = Ledger.from_hash(then_hash).relabelled(settings.model_label)
    now_total, then_total = now_ledger.total(), then_ledger.total()
    cost = now_total.cost_usd - then_total.cost_usd
    standard = now_total.standard_cost_usd - then_total.standard_cost_usd
    return {
        "day": day,
        "since": since,
        "requests": now_total.requests - then_total.requests,
        "cost_usd": _money(cost),
        "standard_cost_usd": _money(standard),
        "savings_usd": _money(standard - cost),
    }


def take_live(client: redis.Redis, settings: Settings) -> LiveView:
    """Run the live plan on a sync client (CLI `status --json`)."""
    return run_plan(client, live_plan(settings))


async def take_live_async(client: aioredis.Redis, settings: Settings) -> LiveView:
    """Run the live plan on an async client (the API's `/v1/stats`)."""
    return await arun_plan(client, live_plan(settings))
