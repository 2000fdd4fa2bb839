"""Exactly one upstream call per request: claiming a stream, and ending one whose worker died.

Celery delivers at least once (acks late, redelivery when a worker is lost), so the stream task
may run twice for one request. The claim makes that harmless:

1. take the lease (``SET NX``): if somebody holds it, a live worker is on the request, and this
   delivery is a duplicate — drop it;
2. move ``dispatched`` → ``streaming`` with the state machine (`allowed_from`): only one claim
   can win this move;
3. if the move is refused because the request is already ``streaming`` while we could take the
   lease, the worker that streamed it died: end it ``failed`` (code ``worker_lost``) with the
   partial content from the replay log, instead of calling the upstream a second time.

The sweep (`workers.stream_sweep`) applies step 3 to ``streaming`` requests whose lease expired.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from router import events as ev
from router.logs import get_logger
from router.lua import CLAIM_STREAM_SCRIPT
from router.records import RequestRecord, now
from router.redis_text import text
from router.store import AsyncRequestStore
from workers.stream_context import StreamContext

log = get_logger(__name__)

ClaimOutcome = Literal["claimed", "duplicate", "terminal", "missing", "worker_lost"]

WORKER_LOST = "worker_lost"


def claim(request_id: str, ctx: StreamContext) -> ClaimOutcome:
    """Try to become the one worker that streams `request_id` (sync; the engine uses `aclaim`)."""
    keys, args = _claim_call(request_id, ctx)
    outcome, _record = _claim_result(request_id, ctx, CLAIM_STREAM_SCRIPT(ctx.redis, keys, args))
    if outcome == "worker_lost":
        _end_lost(request_id, ctx)
    return outcome


async def aclaim(request_id: str, ctx: StreamContext, store: AsyncRequestStore
                 ) -> tuple[ClaimOutcome, RequestRecord | None]:
    """`claim` on the stream engine's loop, returning the claimed record too: steps 1 and 2 (and
    the running index and the `started` event) are one script, so starting a stream costs one
    Redis round trip. The rare `worker_lost` ending runs in a thread (sync store)."""
    keys, args = _claim_call(request_id, ctx)
    raw = await store.scripts.run(CLAIM_STREAM_SCRIPT, keys, args)
    outcome, record = _claim_result(request_id, ctx, raw)
    if outcome == "worker_lost":
        await asyncio.get_running_loop().run_in_executor(None, _end_lost, request_id, ctx)
    return outcome, record


def _claim_call(request_id: str, ctx: StreamContext) -> tuple[list[str], list[Any]]:
    keys = ctx.keys
    s = ctx.settings
    return (
        [keys.record(request_id), keys.lease(request_id), keys.seq(request_id),
         keys.events(request_id), keys.dispatched(), keys.streaming()],
        [request_id, ctx.leases.owner, ctx.leases.lease_ms, now(), keys.channel(request_id),
         s.replay_maxlen, s.replay_ttl_s, ev.started()],
    )


def _claim_result(request_id: str, ctx: StreamContext, raw: list[Any]
                  ) -> tuple[ClaimOutcome, RequestRecord | None]:
    outcome = text(raw[0])
    if outcome == "claimed":
        ctx.leases.adopt(request_id)
        flat = raw[1:]
        return "claimed", RequestRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))
    if outcome == "duplicate":
        log.info("duplicate stream delivery dropped", request_id=request_id)
        return "duplicate", None
    if outcome == "lost":
        ctx.leases.adopt(request_id)
        return "worker_lost", None
    if outcome == "missing":
        return "missing", None
    return "terminal", None


def _end_lost(request_id: str, ctx: StreamContext) -> None:
    try:
        fail_worker_lost(request_id, ctx)
    finally:
        ctx.leases.release(request_id)


def partial_content(request_id: str, ctx: StreamContext) -> tuple[str, int]:
    """The text relayed so far (from the replay log) and how many token events carried it."""
    tokens = [e for e in ctx.store.events_after(request_id, 0) if e.get("type") == "token"]
    return "".join(str(e.get("content", "")) for e in tokens), len(tokens)


def fail_worker_lost(request_id: str, ctx: StreamContext) -> bool:
    """End a ``streaming`` request whose worker is gone; keeps the partial content."""
    content, n_tokens = partial_content(request_id, ctx)
    message = (
        "the stream worker handling this request stopped (crashed or was killed) after "
        f"relaying {len(content)} characters; the partial content is kept in result.content. "
        "Submit the request again to retry."
    )
    outcome = ctx.store.transition(
        request_id, "failed", allowed_from=["streaming"],
        fields={
            "error": {"code": WORKER_LOST, "message": message, "retryable": True},
            "result": {"content": content, "finish_reason": None},
            "content_tokens_relayed": n_tokens,
        },
        event=ev.error(WORKER_LOST, message, True),
    )
    ctx.redis.zrem(ctx.keys.streaming(), request_id)
    if outcome.moved:
        log.warning("stream ended: worker lost", request_id=request_id, chars=len(content))
        if ctx.redis.hget(ctx.keys.record(request_id), "callback_url"):
            try:
                ctx.notify(request_id)
            except Exception:
                log.exception("scheduling the terminal callback failed", request_id=request_id)
    return outcome.moved
