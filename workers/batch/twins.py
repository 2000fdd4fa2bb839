"""Batches the upstream made late, of a file whose create we retried: cancelled.

Why: a failed batch create is tried again only once the upstream's list shows that the failed
try made nothing (`hybrid_router.workers.batch.flush`). But a create can still be on its way when that list is
read (held by a proxy, queued inside the upstream) and be made after the retry's batch: two
batches of the same requests, each one paid, the late one followed by nobody. So a file whose
create needed more than one try is watched for `WATCH_S`, and each flush cancels any batch made
of it other than the one kept. Nothing in Redis changes: the kept batch is the one the requests
are `submitted` in, and the poll writes back only batches Redis knows.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.adopt import batches_made_from
from hybrid_router.workers.upstream.base import UPSTREAM_ERRORS

log = get_logger(__name__)

# How long after the retried create a late batch is still looked for. A create that has not
# reached the upstream by then is not coming.
WATCH_S = 900.0
# A batch in one of these states has nothing left to cancel (a completed one is too late).
NOTHING_TO_CANCEL = frozenset({"failed", "expired", "cancelling", "cancelled"})


def watch_file(client: redis.Redis, keys: Keys, file_id: str, kept_batch_id: str,
               listed_since: float) -> None:
    """Watch `file_id` for batches other than `kept_batch_id` (made since `listed_since`)."""
    entry = orjson.dumps([file_id, kept_batch_id, listed_since])
    client.zadd(keys.late_twin_watch(), {entry: now() + WATCH_S})


def cancel_late_twins(client: redis.Redis, settings: Settings,
                      upstream: openai.OpenAI) -> list[str]:
    """Cancel every batch made of a watched file other than its kept one; stop watching files
    whose time is up. Returns the ids of the batches cancelled."""
    keys = Keys(settings.key_prefix)
    entries: Any = client.zrange(keys.late_twin_watch(), 0, -1, withscores=True)
    if not entries:
        return []
    watched = [(raw, float(until), *orjson.loads(raw)) for raw, until in entries]
    try:
        made = batches_made_from(upstream, {w[2] for w in watched}, min(w[4] for w in watched))
    except UPSTREAM_ERRORS as exc:
        log.warning("late twin batches not checked; next flush", error=str(exc)[:300])
        return []
    cancelled: list[str] = []
    current = now()
    for raw, until, file_id, kept, _since in watched:
        for batch in made.get(file_id, []):
            status = str(batch.status)
            if batch.id == kept or status in NOTHING_TO_CANCEL:
                continue
            if status == "completed":
                log.error("a late second batch of the same file completed before it could be "
                          "cancelled; its results are not used", batch_id=batch.id, kept=kept,
                          input_file_id=file_id)
                continue
            try:
                upstream.batches.cancel(batch.id)
            except UPSTREAM_ERRORS as exc:
                log.warning("cancelling a late second batch failed; next flush",
                            batch_id=batch.id, error=str(exc)[:300])
                continue
            cancelled.append(batch.id)
            log.error("a late second batch of the same file was cancelled", batch_id=batch.id,
                      kept=kept, input_file_id=file_id)
        if until <= current:
            client.zrem(keys.late_twin_watch(), raw)
    return cancelled
