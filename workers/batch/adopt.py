"""Settling a claim whose batch may exist upstream without Redis knowing of it.

Why: a flush uploads a claim's JSONL part, creates the batch, then records it in Redis. A flush
killed between the create and the record (SIGKILL, a Redis outage), or a create whose answer
was lost (a timeout, a 5xx after the upstream made the batch), leaves a batch running upstream
that no poll follows, while its requests are still `queued` in the claim. Releasing that claim
would send them again and pay for them twice.

So the flush notes each upload on its claim (`Keys.claim_uploads`) before it asks for a batch,
and a claim with uploads is settled before it is released: the upstream's batch list is read
back to the claim's time, and

- a batch made from one of the claim's files is recorded and its requests are marked
  `submitted` in it, as the flush would have done (only requests still `queued` move);
- a second batch made from the same file is cancelled (one of them is already paid for);
- a file that no batch was made from is deleted.

While the upstream cannot be asked (no answer, a 429, a 5xx) the claim is kept for the next
flush. An upstream that answers it cannot list or read batches (a 4xx) gets the claim released,
with an error logged: a request sent twice is better than one never sent.

Settling runs under the poll lock, so a poll writing a batch back never misses a request that
is marked `submitted` in that batch half-way through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import redis

from hybrid_router.router.core.endpoints import CHAT
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lock import held
from hybrid_router.workers.batch.poll import file_lines
from hybrid_router.workers.batch.record import mark_submitted, record_batch
from hybrid_router.workers.retry import is_refusal
from hybrid_router.workers.upstream.base import UPSTREAM_ERRORS

log = get_logger(__name__)

# The upstream's clock may be this far behind ours: batches are listed back to this long
# before the claim was made.
CLOCK_SKEW_S = 900.0
LIST_PAGE = 100


@dataclass
class Settlement:
    """What settling one claim found upstream and did about it."""

    adopted: list[str] = field(default_factory=list)
    submitted: int = 0
    cancelled: list[str] = field(default_factory=list)
    files_deleted: int = 0


def note_upload(client: redis.Redis, keys: Keys, claim_id: str, file_id: str) -> None:
    """Remember that a file was uploaded for a claim, before any batch is made of it."""
    client.sadd(keys.claim_uploads(claim_id), file_id)


def settle_uploads(client: redis.Redis, settings: Settings, upstream: openai.OpenAI,
                   claim_id: str) -> Settlement | None:
    """Adopt every batch made from the claim's uploads; None when that could not be checked
    (the upstream or the poll lock was not available), so the claim must be kept."""
    keys = Keys(settings.key_prefix)
    files = {text(f) for f in client.smembers(keys.claim_uploads(claim_id))}
    settlement = Settlement()
    if not files:
        return settlement
    since = float(client.zscore(keys.claims(), claim_id) or 0.0) - CLOCK_SKEW_S
    with held(client, keys.poll_lock(), settings.batch_lock_ttl_s,
              wait_s=settings.batch_lock_ttl_s) as lock:
        if lock is None:
            log.warning("claim not settled: the poll lock stayed taken", claim_id=claim_id)
            return None
        try:
            made = batches_made_from(upstream, files, since)
            for file_id in sorted(files):
                _settle_file(client, settings, upstream, file_id, made.get(file_id, []),
                             settlement)
        except UPSTREAM_ERRORS as exc:
            if not is_refusal(exc):  # worth asking again later
                log.warning("claim not settled: the upstream could not be checked",
                            claim_id=claim_id, error=str(exc)[:300])
                return None
            # An upstream that cannot list batches or read them back will never say more:
            # keeping the claim would keep its requests forever.
            log.error("claim released without knowing which batches the upstream made of "
                      "it; its requests may be sent twice", claim_id=claim_id,
                      error=str(exc)[:300])
    log.info("claim settled", claim_id=claim_id, uploads=len(files),
             adopted=settlement.adopted, submitted=settlement.submitted,
             cancelled=settlement.cancelled, files_deleted=settlement.files_deleted)
    return settlement


def batches_made_from(upstream: openai.OpenAI, file_ids: Collection[str],
                      since: float) -> dict[str, list[Any]]:
    """Upstream batches created since `since` whose input is one of `file_ids`, oldest first.

    The list comes newest first, so it is read only back to `since`.
    """
    found: dict[str, list[Any]] = {}
    for batch in upstream.batches.list(limit=LIST_PAGE):
        if batch.created_at < since:
            break
        if batch.input_file_id in file_ids:
            found.setdefault(batch.input_file_id, []).append(batch)
    return {file_id: made[::-1] for file_id, made in found.items()}


def _settle_file(client: redis.Redis, settings: Settings, upstream: openai.OpenAI,
                 file_id: str, made: list[Any], settlement: Settlement) -> None:
    keys = Keys(settings.key_prefix)
    if not made:
        with contextlib.suppress(openai.NotFoundError):
            upstream.files.delete(file_id)
        settlement.files_deleted += 1
        return
    # Keep the batch Redis already follows, if any; otherwise the first one made.
    known = [b for b in made if client.exists(keys.batch(b.id))]
    keep = (known or made)[0]
    settlement.submitted += adopt_batch(client, settings, upstream, keep)
    settlement.adopted.append(keep.id)
    for extra in made:
        if extra.id != keep.id:
            upstream.batches.cancel(extra.id)
            settlement.cancelled.append(extra.id)
            log.error("a second batch of the same file was cancelled", batch_id=extra.id,
                      kept=keep.id, input_file_id=file_id)


def adopt_batch(client: redis.Redis, settings: Settings, upstream: openai.OpenAI,
                batch: Any) -> int:
    """Record `batch` (unless Redis has it) and mark its still-`queued` requests submitted in it.

    Returns how many requests moved. The batch is put (back) in flight when any did: a poll may
    have written it back already, before these requests were its members.
    """
    keys = Keys(settings.key_prefix)
    ids, line_model = read_input(upstream, str(batch.input_file_id))
    metadata = batch.metadata or {}
    if not client.exists(keys.batch(batch.id)):
        record_batch(client, settings, str(batch.id), metadata.get("model") or line_model,
                     "native", len(ids), input_file_id=str(batch.input_file_id),
                     flush_id=metadata.get("flush_id") or "",
                     endpoint=str(getattr(batch, "endpoint", None) or CHAT))
    moved = mark_submitted(client, settings, str(batch.id), ids)
    if moved:
        client.zadd(keys.batches_in_flight(), {str(batch.id): now()}, nx=True)
    log.warning("batch adopted", batch_id=batch.id, requests=len(ids), submitted=moved)
    return moved


def read_input(upstream: openai.OpenAI, file_id: str) -> tuple[list[str], str]:
    """The custom ids of a batch input file, in order, and the model of its first line."""
    ids: list[str] = []
    model = ""
    for line in file_lines(upstream, file_id):
        row = orjson.loads(line)
        ids.append(str(row["custom_id"]))
        if not model:
            model = str((row.get("body") or {}).get("model") or "")
    return ids, model
