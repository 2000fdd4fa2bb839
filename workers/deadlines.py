"""Deadline escalation: a queued low request that a batch would deliver too late streams instead.

A request enters `Keys.batch_deadlines()` at intake when it has a deadline, and is in it exactly
while it is `queued`: it leaves when it is submitted in a batch, cancelled, failed or escalated,
and comes back when a batch puts it back in its queue (so no finished request stays in the
index, whatever its deadline, and a requeued one is escalated in time). Each flush checks
the requests it claims (now + expected turnaround past the deadline → escalate), and each poll
checks the set against the time of the next flush (`escalate_due`). The move is one script
that acts only while the request is still `queued`, then the stream task is sent; if a batch
result were to arrive too, the state machine keeps the first result and refuses the second.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.endpoints import CHAT, batch_queue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.router.core.runtime_config import get_flush_interval
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lua import ESCALATE_SCRIPT

log = get_logger(__name__)

StreamDispatch = Callable[[str], None]


def escalate(client: redis.Redis, settings: Settings, request_id: str, model: str, reason: str,
             dispatch: StreamDispatch | None) -> bool:
    """Move one request to the stream lane if it is still `queued`; True when it moved.
    `model`: its batch queue (`hybrid_router.router.core.endpoints.batch_queue`)."""
    k = Keys(settings.key_prefix)
    at = now()
    moved = int(ESCALATE_SCRIPT(
        client,
        [k.record(request_id), k.seq(request_id), k.events(request_id), k.pending(model),
         k.dispatched(), k.batch_deadlines()],
        [request_id, k.channel(request_id), settings.replay_maxlen, replay_policy(settings),
         repr(at), reason, ev.queued(None, f"escalated to stream: {reason}")],
    ))
    if not moved:
        return False
    log.info("request escalated to stream", request_id=request_id, reason=reason)
    if dispatch is not None:
        # If this send fails the stream sweep sends it again (the request is in dispatched).
        dispatch(request_id)
    return True


def seconds_to_next_flush(client: redis.Redis, settings: Settings) -> float:
    """How long until the next scheduled flush (runtime interval after the last flush)."""
    interval = get_flush_interval(client, settings)
    raw = client.hget(Keys(settings.key_prefix).last_flush(), "at")
    if raw is None:
        return interval
    return max(0.0, float(raw) + interval - now())


def escalate_due(client: redis.Redis, settings: Settings,
                 dispatch: StreamDispatch | None) -> int:
    """Escalate every queued request whose deadline falls before next flush + turnaround."""
    k = Keys(settings.key_prefix)
    cutoff = now() + seconds_to_next_flush(client, settings) + settings.expected_batch_turnaround_s
    ids = [text(x) for x in client.zrangebyscore(k.batch_deadlines(), "-inf", cutoff, start=0, num=1000)]
    moved = 0
    for request_id in ids:
        model, endpoint = client.hmget(k.record(request_id), ["model", "endpoint"])
        if model is None:
            client.zrem(k.batch_deadlines(), request_id)
            continue
        reason = ("deadline would be missed waiting for the next flush plus the expected batch "
                  f"turnaround ({settings.expected_batch_turnaround_s:g}s), so it streams")
        queue = batch_queue(text(endpoint) if endpoint else CHAT, text(model))
        if escalate(client, settings, request_id, queue, reason, dispatch):
            moved += 1
    return moved
