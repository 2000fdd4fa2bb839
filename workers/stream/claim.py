"""Exactly one upstream call at a time per request: claiming a stream, and taking over one whose
worker died.

Celery delivers at least once (acks late, redelivery when a worker is lost), so the stream task
may run twice for one request. The claim makes that harmless:

1. take the lease (``SET NX``): if somebody holds it, a live worker is on the request, and this
   delivery is a duplicate — drop it;
2. move ``dispatched`` → ``streaming`` with the state machine: only one claim can win this move;
3. if the request is already ``streaming`` while we could take the lease, the worker that
   streamed it died (or lost Redis for longer than its lease): the claim takes it over
   (``lost``) and the caller *resumes* it from the last token in the replay log
   (`hybrid_router.workers.stream.relay`), or ends it ``failed`` (code ``worker_lost``) with the partial content
   where it cannot be resumed (`Settings.stream_resume` off with text already relayed, or the
   retry budget spent).

The sweep (`hybrid_router.workers.stream.sweep`) finds ``streaming`` requests whose lease expired and hands
them to a live stream engine, which claims them the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.lua import CLAIM_STREAM_SCRIPT
from hybrid_router.router.core.records import RequestRecord, now
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.workers.stream.context import StreamContext

log = get_logger(__name__)

ClaimOutcome = Literal["claimed", "duplicate", "terminal", "missing", "worker_lost"]

WORKER_LOST = "worker_lost"


async def aclaim(request_id: str, ctx: StreamContext, store: AsyncRequestStore,
                 taken: tuple[str, bytes] | None = None
                 ) -> tuple[ClaimOutcome, RequestRecord | None]:
    """Try to become the one worker that streams `request_id`, on the stream engine's loop,
    returning the record too: steps 1 and 2 (and the running index and the `started` event)
    are one script, so starting a stream costs one Redis round trip. `taken`: the (taken list,
    message) the engine took the task from; the same script drops it from that list.

    Outcomes: ``claimed`` (stream it), ``worker_lost`` (a dead worker's stream, now ours:
    resume it), ``duplicate``, ``terminal``, ``missing`` (nothing to do). The script is safe to
    repeat after a lost reply: the lease's owner gets ``claimed`` again."""
    keys, args = _claim_call(request_id, ctx)
    if taken is not None:
        keys.append(taken[0])
        args.append(taken[1])
    raw = await store.scripts.run(CLAIM_STREAM_SCRIPT, keys, args)
    return _claim_result(request_id, ctx, raw)


def _claim_call(request_id: str, ctx: StreamContext) -> tuple[list[str], list[Any]]:
    keys = ctx.keys
    s = ctx.settings
    return (
        [keys.record(request_id), keys.lease(request_id), keys.seq(request_id),
         keys.events(request_id), keys.dispatched(), keys.streaming()],
        [request_id, ctx.leases.owner, ctx.leases.lease_ms, now(), keys.channel(request_id),
         s.replay_maxlen, replay_policy(s), ev.started()],
    )


def _claim_result(request_id: str, ctx: StreamContext, raw: list[Any]
                  ) -> tuple[ClaimOutcome, RequestRecord | None]:
    outcome = text(raw[0])
    if outcome == "mine" and ctx.leases.holds(request_id):
        outcome = "duplicate"  # this process streams it already
    if outcome in ("claimed", "mine", "lost"):
        ctx.leases.adopt(request_id)
        flat = raw[1:]
        record = RequestRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
        return ("worker_lost" if outcome == "lost" else "claimed"), record
    if outcome == "duplicate":
        log.info("duplicate stream delivery dropped", request_id=request_id)
        return "duplicate", None
    if outcome == "missing":
        return "missing", None
    return "terminal", None
