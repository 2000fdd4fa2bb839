"""The stream sweep (beat, every 5 s): no request stays ``streaming`` or ``dispatched`` forever.

- ``streaming`` requests (`Keys.streaming()`) whose lease expired lost their worker (SIGKILL,
  OOM, machine gone): they end ``failed`` with code ``worker_lost`` and their partial content.
- ``dispatched`` requests (`Keys.dispatched()`) not claimed within
  ``Settings.stream_redispatch_after_s`` (a lost broker message, a queue purged) are sent to the
  stream queue again; the claim makes an extra delivery harmless.
- Entries of requests that are already terminal or gone are removed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.logs import get_logger
from router.records import now
from workers.stream_claim import fail_worker_lost
from workers.stream_context import StreamContext

log = get_logger(__name__)

SWEEP_BATCH = 1000
_TERMINAL = (b"completed", b"failed", b"cancelled")


@dataclass
class SweepReport:
    worker_lost: int = 0
    redispatched: int = 0
    cleaned: int = 0


def sweep_streams(ctx: StreamContext, redispatch: Callable[[str], None]) -> SweepReport:
    """One sweep; `redispatch(request_id)` sends the stream task again."""
    report = SweepReport()
    _sweep_streaming(ctx, report)
    _sweep_dispatched(ctx, redispatch, report)
    if report.worker_lost or report.redispatched:
        log.info("stream sweep", worker_lost=report.worker_lost,
                 redispatched=report.redispatched, cleaned=report.cleaned)
    return report


def _statuses(ctx: StreamContext, ids: list[str]) -> list[bytes | None]:
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(ctx.keys.record(request_id), "status")
    return list(pipe.execute())


def _sweep_streaming(ctx: StreamContext, report: SweepReport) -> None:
    keys = ctx.keys
    raw: Any = ctx.redis.zrange(keys.streaming(), 0, SWEEP_BATCH - 1)
    ids = [i.decode() for i in raw]
    if not ids:
        return
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.exists(keys.lease(request_id))
    leased = pipe.execute()
    orphans = [i for i, alive in zip(ids, leased, strict=True) if not alive]
    if not orphans:
        return
    for request_id, status in zip(orphans, _statuses(ctx, orphans), strict=True):
        if status == b"streaming":
            # Take the lease so a late redelivery of the task cannot start the upstream now.
            if not ctx.leases.acquire(request_id):
                continue
            try:
                if fail_worker_lost(request_id, ctx):
                    report.worker_lost += 1
            finally:
                ctx.leases.release(request_id)
        elif status is None or status in _TERMINAL:
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
