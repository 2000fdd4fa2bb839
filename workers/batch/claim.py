"""Claiming pending requests for a flush, and putting claims back (one place, like dramatiq).

A claim moves the head of one model's pending list into `Keys.claimed(claim_id)` in one script
and registers the claim in `Keys.claims()`. The claim is dropped only once every id in it is
either submitted or back in its queue, so a flush that dies at any point loses nothing: the
next flush (which holds the flush lock, so no other flush is running) releases every claim it
finds. Ids that are no longer `queued` (cancelled, escalated, submitted) are never put back.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import redis

from hybrid_router.router.core.endpoints import CHAT, batch_queue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_text import text_or_none
from hybrid_router.workers.batch.lua import CLAIM_SCRIPT, FETCH_SCRIPT, RELEASE_SCRIPT, run_overlapped

log = get_logger(__name__)

FETCH_CHUNK = 1000
RELEASE_CHUNK = 5000


@dataclass(frozen=True)
class Claim:
    claim_id: str
    model: str  # the batch queue's name: the model, or ``<endpoint>|<model>`` (hybrid_router.router.core.endpoints)
    ids: list[str]


class ClaimedRow(NamedTuple):
    """What a flush needs of one claimed request (a tuple: a flush builds 50,000 of them)."""

    id: str
    status: str | None
    model: str | None
    body_json: bytes | None
    deadline_at: float | None
    group: str | None  # set when a failed batch was split: the flush batches the group alone
    endpoint: str | None = None  # None: chat completions

    @property
    def queue(self) -> str | None:
        """The batch queue the request waits in (`hybrid_router.router.core.endpoints.batch_queue`)."""
        return batch_queue(self.endpoint or CHAT, self.model) if self.model else None


def new_claim_id() -> str:
    return uuid.uuid4().hex


def claim(client: redis.Redis, keys: Keys, model: str, limit: int) -> Claim | None:
    """Claim up to `limit` ids from the head of `model`'s pending list (None when empty)."""
    claim_id = new_claim_id()
    raw = CLAIM_SCRIPT(
        client,
        [keys.pending(model), keys.claimed(claim_id), keys.claims(), keys.pending_models()],
        [limit, claim_id, now(), model],
    )
    ids = [text_or_none(x) or "" for x in raw]
    if not ids:
        return None
    return Claim(claim_id, model, ids)


def fetch_rows(client: redis.Redis, keys: Keys, ids: Sequence[str],
               chunk: int = FETCH_CHUNK) -> Iterator[ClaimedRow]:
    """Status, model, body JSON, deadline and batch group of each id, read in chunks (memory
    stays flat).

    The next chunk is read by Redis while this one is handed out (`run_overlapped`).
    """
    fields = ["status", "model", "body", "deadline_at", "batch_group", "endpoint"]
    parts = (ids[start:start + chunk] for start in range(0, len(ids), chunk))
    calls = ((part, ([keys.record(i) for i in part], fields)) for part in parts)
    for part, flat in run_overlapped(client, FETCH_SCRIPT, calls):
        for request_id, status, model, body, deadline, group, endpoint in zip(
                part, flat[0::6], flat[1::6], flat[2::6], flat[3::6], flat[4::6], flat[5::6],
                strict=True):
            yield ClaimedRow(
                request_id,
                text_or_none(status),
                text_or_none(model),
                body if isinstance(body, bytes) or body is None else str(body).encode(),
                float(deadline) if deadline else None,
                text_or_none(group),
                text_or_none(endpoint),
            )


def release(client: redis.Redis, keys: Keys, claim_id: str, ids: Sequence[str] | None = None,
            ) -> int:
    """Put the still-`queued` ids of a claim back at the front of their queues; drop the claim.

    `ids` defaults to the claim's list in Redis. Duplicates are removed (a release interrupted
    half-way may be run again). Returns how many ids went back.
    """
    if ids is None:
        ids = [text_or_none(x) or "" for x in client.lrange(keys.claimed(claim_id), 0, -1)]
    seen: set[str] = set()
    unique = [i for i in ids if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]
    by_model: dict[str, list[str]] = {}
    for row in fetch_rows(client, keys, unique):
        if row.status == "queued" and row.queue:
            by_model.setdefault(row.queue, []).append(row.id)
    # Put back in reverse chunk order so the queue keeps the claimed order at its front.
    calls: list[tuple[str, list[str]]] = []
    for model, model_ids in by_model.items():
        for start in range(0, len(model_ids), RELEASE_CHUNK):
            calls.append((model, model_ids[start:start + RELEASE_CHUNK]))
    calls.reverse()
    if not calls:
        calls = [("", [])]
    for n, (model, part) in enumerate(calls):
        last = n == len(calls) - 1
        RELEASE_SCRIPT(
            client,
            [keys.pending(model or "-"), keys.pending_models(), keys.claimed(claim_id),
             keys.claims(), keys.claim_uploads(claim_id)],
            [model, claim_id, "1" if last else "0", *part],
        )
    returned = sum(len(part) for _m, part in calls)
    if returned:
        log.info("claim released", claim_id=claim_id, requeued=returned)
    return returned


def drop(client: redis.Redis, keys: Keys, claim_id: str) -> None:
    """Forget a claim whose ids are all submitted (or otherwise accounted for)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.claimed(claim_id), keys.claim_uploads(claim_id))
    pipe.zrem(keys.claims(), claim_id)
    pipe.execute()


SettleClaim = Callable[[str], bool]


def recover_orphaned_claims(client: redis.Redis, keys: Keys,
                            settle: SettleClaim | None = None) -> int:
    """Release every claim left by a flush that died. Call only while holding the flush lock.

    `settle(claim_id)` runs first and may keep a claim for the next flush by returning False
    (the flush's check for batches made from the claim's uploads could not reach the upstream).
    """
    total = 0
    for raw in client.zrange(keys.claims(), 0, -1):
        claim_id = text_or_none(raw if isinstance(raw, (bytes, str)) else str(raw)) or ""
        if settle is not None and not settle(claim_id):
            log.warning("orphaned claim kept for the next flush", claim_id=claim_id)
            continue
        total += release(client, keys, claim_id)
        log.warning("orphaned claim recovered", claim_id=claim_id)
    return total
