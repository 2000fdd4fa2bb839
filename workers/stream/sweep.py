"""The stream sweep: no request stays ``streaming`` or ``dispatched`` forever, and no stream is
lost with its worker.

Every stream engine runs it about once a second (`hybrid_router.workers.stream.engine`); a short Redis lock
lets one engine at a time do it, so it appears nowhere in Celery (no task per sweep):

- ``streaming`` requests (`Keys.streaming()`) whose lease expired lost their worker (SIGKILL,
  OOM, machine gone, or Redis out of reach for longer than the lease): once seen without a
  lease for two seconds, they are handed to this engine, whose claim takes them over and
  resumes them from the last token in the replay log (`hybrid_router.workers.stream.relay`), as many as it has
  free slots for;
- ``dispatched`` requests (`Keys.dispatched()`) not claimed within
  ``Settings.stream_redispatch_after_s`` (a broker message lost with Redis data, a queue
  purged) are sent to the stream queue again; the claim makes an extra delivery harmless;
- entries of requests that are already terminal or gone are removed.

A task message a dead engine had taken off the queue but not claimed is not the sweep's: the
engines hand those back within the lease (`hybrid_router.workers.stream.engine`, `RESTORE_TAKEN`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.states import TERMINAL_BYTES
from hybrid_router.workers.stream.context import StreamContext

log = get_logger(__name__)

SWEEP_BATCH = 1000


@dataclass
class SweepReport:
    resumed: int = 0
    redispatched: int = 0
    cleaned: int = 0


def sweep_streams(ctx: StreamContext, resume: Callable[[str], None],
                  redispatch: Callable[[str], None], capacity: int,
                  orphans_seen: dict[str, float] | None = None,
                  confirm_s: float = 0.0) -> SweepReport:
    """One sweep: `resume(request_id)` takes over a stream whose worker is gone (at most
    `capacity` of them), `redispatch(request_id)` sends the stream task again.

    With `orphans_seen` (request id -> when first seen without a lease, kept by the caller
    between sweeps), a stream is taken over only once it has had no lease for `confirm_s`:
    a live worker whose lease lapsed while Redis was away takes it back within a second, and
    a take-over of a stream that still runs costs a second upstream call."""
    report = SweepReport()
    _sweep_streaming(ctx, resume, capacity, report,
                     {} if orphans_seen is None else orphans_seen, confirm_s)
    _sweep_dispatched(ctx, redispatch, report)
    if report.resumed or report.redispatched:
        log.info("stream sweep", resumed=report.resumed, redispatched=report.redispatched,
                 cleaned=report.cleaned)
    return report


def _statuses(ctx: StreamContext, ids: list[str]) -> list[bytes | None]:
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(ctx.keys.record(request_id), "status")
    return list(pipe.execute())


def _sweep_streaming(ctx: StreamContext, resume: Callable[[str], None], capacity: int,
                     report: SweepReport, seen: dict[str, float], confirm_s: float) -> None:
    keys = ctx.keys
    raw: Any = ctx.redis.zrange(keys.streaming(), 0, SWEEP_BATCH - 1)
    ids = [i.decode() for i in raw]
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.exists(keys.lease(request_id))
    leased = pipe.execute() if ids else []
    orphans = [i for i, alive in zip(ids, leased, strict=True) if not alive]
    for gone in set(seen) - set(orphans):
        del seen[gone]
    if not orphans:
        return
    at = now()
    for request_id, status in zip(orphans, _statuses(ctx, orphans), strict=True):
        if status == b"streaming":
            first_seen = seen.setdefault(request_id, at)
            if at - first_seen >= confirm_s and report.resumed < capacity:
                seen.pop(request_id, None)
                resume(request_id)  # the claim takes the lease: only one engine gets it
                report.resumed += 1
        elif status is None or status in TERMINAL_BYTES:
            ctx.redis.zrem(keys.streaming(), request_id)
            report.cleaned += 1


def _sweep_dispatched(ctx: StreamContext, redispatch: Callable[[str], None],
                      report: SweepReport) -> None:
    keys = ctx.keys
    cutoff = now() - ctx.settings.stream_redispatch_after_s
    raw: Any = ctx.redis.zrangebyscore(keys.dispatched(), "-inf", cutoff, start=0,
                                       num=SWEEP_BATCH)
    ids = [i.decode() for i in raw]
    if not ids:
        return
    for request_id, status in zip(ids, _statuses(ctx, ids), strict=True):
        if status == b"dispatched":
            redispatch(request_id)
            ctx.redis.zadd(keys.dispatched(), {request_id: now()}, xx=True)
            report.redispatched += 1
        elif status != b"streaming":
            ctx.redis.zrem(keys.dispatched(), request_id)
            report.cleaned += 1
