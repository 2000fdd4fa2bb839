"""The flush: send every pending low request upstream, one batch per endpoint and model (one
batch queue each, `hybrid_router.router.core.endpoints.batch_queue`).

    lock → settle and release orphaned claims → for each model: claim → read records
    → JSONL parts → per part: upload, note the upload on the claim, create batch, record it in
    flight, mark requests `submitted` → drop the claim → note the flush in `Keys.last_flush()`

The order makes a crash harmless at every step: a batch is recorded in flight *before* any of
its requests says `submitted` (so a submitted request always has a batch to poll), and a claim
is dropped only after each of its ids is submitted or back in the queue. A batch the upstream
made but Redis never heard of (the flush died, or the create's answer was lost) is found from
the claim's noted uploads and adopted before the claim is released (`hybrid_router.workers.batch.adopt`), so
no request is ever in two batches. An upload or create failure puts the claim's unsubmitted
requests back at the front of their queue, untouched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.endpoints import split_queue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import dumps, now
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from hybrid_router.workers.batch.adopt import CLOCK_SKEW_S, batches_made_from, note_upload, settle_uploads
from hybrid_router.workers.batch.claim import Claim, ClaimedRow
from hybrid_router.workers.batch.jsonl import JsonlPart, line_size, write_parts
from hybrid_router.workers.batch.lock import RedisLock, held
from hybrid_router.workers.batch.lua import FINISH_SCRIPT, run_pipelined
from hybrid_router.workers.batch.mode import ResolvedMode, resolve_batch_mode
from hybrid_router.workers.batch.record import mark_submitted, record_batch
from hybrid_router.workers.batch.refusal import count_refusal
from hybrid_router.workers.batch.twins import cancel_late_twins, watch_file
from hybrid_router.workers.batch.writeback import Notify, no_notify
from hybrid_router.workers.deadlines import StreamDispatch, escalate
from hybrid_router.workers.retry import RetryPolicy, is_refusal, is_retryable, retry_after_seconds
from hybrid_router.workers.upstream.base import UPSTREAM_ERRORS, upstream_answer

log = get_logger(__name__)

# Tries at creating one batch. Each failed try is checked against the upstream's batch list
# before the next: the SDK's own retry could make a second batch of the same requests.
CREATE_ATTEMPTS = 3

AfterClaim = Callable[[Claim], None]
AfterCreate = Callable[[str], None]
BeforeCreate = Callable[[str], None]
SendEmulated = Callable[[str], None]


@dataclass
class FlushReport:
    flush_id: str
    ran: bool = True  # False when another flush held the lock
    mode: str = ""
    recovered: int = 0
    adopted: int = 0  # batches made upstream by a flush that died before recording them
    submitted: int = 0
    skipped: int = 0
    escalated: int = 0
    failed: int = 0
    requeued_on_error: int = 0
    # Batches the upstream made late from a create that was retried (see hybrid_router.workers.batch.twins).
    late_twins_cancelled: list[str] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class FlushContext:
    """Everything one flush needs, passed down explicitly."""

    settings: Settings
    client: redis.Redis
    upstream: openai.OpenAI
    notify: Notify = no_notify
    dispatch_stream: StreamDispatch | None = None
    send_emulated: SendEmulated | None = None
    after_claim: AfterClaim | None = None  # test hook: runs right after each claim
    after_create: AfterCreate | None = None  # test hook: a batch was made, not yet recorded
    before_create: BeforeCreate | None = None  # test hook: a file was uploaded, no batch yet

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)


class UpstreamSubmitError(Exception):
    """Uploading the file or creating the batch failed; the claim was put back.

    `refused`: the upstream answered with a 4xx that waiting will not cure, so the failure
    counts against the requests' attempts (`hybrid_router.workers.batch.refusal`); `reason` says what it
    answered."""

    def __init__(self, message: str, *, refused: bool = False, reason: str = "") -> None:
        super().__init__(message)
        self.refused = refused
        self.reason = reason or message


class FlushLockLost(Exception):
    """The flush lock expired under a running flush (a stall longer than its lease): another
    flush may hold it and settle this flush's claim, so this one stops touching it."""


def _require_lock(lock: RedisLock, when: str) -> None:
    """Stop (`FlushLockLost`) unless Redis still gives the flush lock to this flush: asked right
    before a step that the lock's next holder must never see half-done."""
    if not lock.still_held():
        raise FlushLockLost(f"the flush lock was lost {when}; the claim is left to the flush "
                            "that holds it")


def flush(ctx: FlushContext, *, models: list[str] | None = None) -> FlushReport:
    """Flush every pending model (or `models`) once; never two flushes at a time."""
    started = time.monotonic()
    report = FlushReport(flush_id=uuid.uuid4().hex)
    keys = ctx.keys
    with held(ctx.client, keys.flush_lock(), ctx.settings.batch_lock_ttl_s) as lock:
        if lock is None:
            report.ran = False
            return report
        report.recovered = batch_claim.recover_orphaned_claims(
            ctx.client, keys, settle=lambda claim_id: _settle(ctx, report, claim_id))
        report.late_twins_cancelled = cancel_late_twins(ctx.client, ctx.settings, ctx.upstream)
        names = models if models is not None else sorted(
            text(m) for m in ctx.client.smembers(keys.pending_models())
        )
        if not names:
            _note_flush(ctx, report, started)
            return report
        report.mode = resolve_batch_mode(ctx.settings, ctx.client, ctx.upstream)
        try:
            for model in names:
                _flush_model(ctx, lock, report, model)
        except UpstreamSubmitError as exc:
            report.error = str(exc)
        except FlushLockLost as exc:
            report.error = str(exc)
            log.error("flush stopped: its lock was lost", flush_id=report.flush_id)
        _note_flush(ctx, report, started)
    log.info("flush done", flush_id=report.flush_id, mode=report.mode,
             submitted=report.submitted, batches=len(report.batches),
             escalated=report.escalated, recovered=report.recovered, adopted=report.adopted,
             error=report.error,
             seconds=round(report.seconds, 3))
    return report


def _settle(ctx: FlushContext, report: FlushReport, claim_id: str) -> bool:
    """Adopt any batch made from the claim's uploads; False keeps the claim for later."""
    settlement = settle_uploads(ctx.client, ctx.settings, ctx.upstream, claim_id)
    if settlement is None:
        return False
    report.adopted += len(settlement.adopted)
    report.submitted += settlement.submitted
    return True


def _note_flush(ctx: FlushContext, report: FlushReport, started: float) -> None:
    report.seconds = time.monotonic() - started
    ctx.client.hset(ctx.keys.last_flush(), mapping={
        "at": repr(now()), "flush_id": report.flush_id, "submitted": report.submitted,
        "batches": len(report.batches), "error": report.error or "",
    })


def _flush_model(ctx: FlushContext, lock: RedisLock, report: FlushReport, model: str) -> None:
    limit = ctx.settings.batch_max_requests
    while True:
        claim = batch_claim.claim(ctx.client, ctx.keys, model, limit)
        if claim is None:
            return
        if ctx.after_claim is not None:
            ctx.after_claim(claim)
        _flush_claim(ctx, lock, report, claim, report.mode)  # type: ignore[arg-type]
        lock.extend()
        if len(claim.ids) < limit:
            return


def _parts(ctx: FlushContext, report: FlushReport, claim: Claim
           ) -> Generator[JsonlPart, None, None]:
    """The claim's input files: the requests of no group together, then each group of a split
    batch (`hybrid_router.workers.batch.split`) in files of its own, so a line at fault shares none."""
    s = ctx.settings
    url, _model = split_queue(claim.model)
    groups: dict[str, list[tuple[str, bytes]]] = {}
    yield from write_parts(_lines(ctx, report, claim, groups), s.batch_max_requests,
                           s.batch_max_bytes, url=url)
    for group in groups.values():
        yield from write_parts(group, s.batch_max_requests, s.batch_max_bytes, url=url)


def _lines(ctx: FlushContext, report: FlushReport, claim: Claim,
           groups: dict[str, list[tuple[str, bytes]]]) -> Iterator[tuple[str, bytes]]:
    """The (id, body JSON) pairs worth sending; escalates and fails the others on the way.
    Requests that belong to a group are set aside in `groups` instead of being yielded.

    What the Batch API would refuse the whole file for is checked here, line by line, so that
    no line can fail the others: a custom_id twice (`duplicate_custom_id`: an id is sent once
    per claim), a line over the file size limit (failed alone). One model per file and valid
    bodies are ensured at intake; anything else fails the batch as a whole upstream, and the
    batch is then split to find the line at fault (`hybrid_router.workers.batch.split`)."""
    s = ctx.settings
    url, _model = split_queue(claim.model)
    cutoff = now() + s.expected_batch_turnaround_s
    seen: set[str] = set()
    for row in batch_claim.fetch_rows(ctx.client, ctx.keys, claim.ids):
        if row.status != "queued" or row.body_json is None or row.id in seen:
            report.skipped += 1
            continue
        seen.add(row.id)
        if row.deadline_at is not None and row.deadline_at < cutoff:
            reason = (f"deadline would be missed by a batch (expected turnaround "
                      f"{s.expected_batch_turnaround_s:g}s), so it streams")
            if escalate(ctx.client, s, row.id, claim.model, reason, ctx.dispatch_stream):
                report.escalated += 1
            continue
        if line_size(row.id, row.body_json, url) > s.batch_max_bytes:
            _fail_oversized(ctx, row)
            report.failed += 1
            continue
        if row.group:
            groups.setdefault(row.group, []).append((row.id, row.body_json))
            continue
        yield row.id, row.body_json


def _fail_oversized(ctx: FlushContext, row: ClaimedRow) -> None:
    k, s = ctx.keys, ctx.settings
    message = (f"the request is larger than the batch file limit of {s.batch_max_bytes} bytes; "
               "send it with priority high")
    error = {"code": "request_too_large_for_batch", "message": message, "retryable": False}
    answers = run_pipelined(ctx.client, FINISH_SCRIPT, [(
        [k.record(row.id), k.seq(row.id), k.events(row.id), k.ledger(), k.batch_deadlines()],
        ["queued", "failed", k.channel(row.id), s.replay_maxlen, replay_policy(s), s.result_ttl_s,
         ev.error("request_too_large_for_batch", message, False), 0,
         "error", dumps(error), "finished_at", repr(now())],
    )])
    if int(answers[0][0]) == 1 and answers[0][2]:
        ctx.notify(row.id)


def _flush_claim(ctx: FlushContext, lock: RedisLock, report: FlushReport, claim: Claim,
                 mode: ResolvedMode) -> None:
    parts = _parts(ctx, report, claim)
    try:
        for part in parts:
            try:
                batch_id, file_id = (_submit_native(ctx, lock, report, claim, part)
                                     if mode == "native" else _submit_emulated(ctx, lock, claim,
                                                                               part))
            finally:
                part.remove()
            moved = mark_submitted(ctx.client, ctx.settings, batch_id, part.ids)
            if file_id:  # every request of this upload is accounted for
                ctx.client.srem(ctx.keys.claim_uploads(claim.claim_id), file_id)
            report.submitted += moved
            report.batches.append({"batch_id": batch_id, "model": claim.model,
                                   "requests": len(part.ids), "bytes": part.size})
            if mode == "emulated" and ctx.send_emulated is not None:
                ctx.send_emulated(batch_id)
    except UpstreamSubmitError as exc:
        # Put back only what no batch holds; if that cannot be told, the next flush settles it.
        _require_lock(lock, f"while {exc}")
        if _settle(ctx, report, claim.claim_id):
            if exc.refused:  # counted first: the release puts back only what is still queued
                report.failed += count_refusal(ctx.client, ctx.settings, claim.ids,
                                               exc.reason, ctx.notify).failed
            report.requeued_on_error += batch_claim.release(ctx.client, ctx.keys,
                                                            claim.claim_id)
        raise
    finally:
        parts.close()  # a part being written when we stop is removed by write_parts
    batch_claim.drop(ctx.client, ctx.keys, claim.claim_id)


def _submit_native(ctx: FlushContext, lock: RedisLock, report: FlushReport, claim: Claim,
                   part: JsonlPart) -> tuple[str, str]:
    """Upload the part and make a batch of it, once; returns (batch id, input file id).

    The lock is asked for right before the batch is made: a flush that lost it during a long
    upload (a stall longer than the lease) may have had its claim settled by the flush that now
    holds it, which deletes an upload no batch was made from and puts the requests back; making
    a batch of them now would send them twice."""
    s = ctx.settings
    try:
        with part.path.open("rb") as fh:
            uploaded = ctx.upstream.files.create(file=(part.path.name, fh), purpose="batch")
        note_upload(ctx.client, ctx.keys, claim.claim_id, uploaded.id)
        if ctx.before_create is not None:
            ctx.before_create(uploaded.id)
        _require_lock(lock, f"before a batch of {claim.model} was made of upload {uploaded.id}")
        batch_id = _create_batch_once(ctx, report, claim, uploaded.id)
    except UPSTREAM_ERRORS as exc:
        refused = is_refusal(exc)
        log.error("batch submit failed; claim put back", model=claim.model,
                  requests=len(part.ids), refused=refused, error=str(exc)[:500])
        reason = upstream_answer(exc) if isinstance(exc, openai.APIStatusError) else str(exc)
        raise UpstreamSubmitError(f"submitting a batch of {claim.model} failed: {exc}",
                                  refused=refused, reason=reason) from exc
    if ctx.after_create is not None:
        ctx.after_create(batch_id)
    endpoint, model = split_queue(claim.model)
    record_batch(ctx.client, s, batch_id, model, "native", len(part.ids),
                 input_file_id=uploaded.id, flush_id=report.flush_id, endpoint=endpoint)
    return batch_id, uploaded.id


def _create_batch_once(ctx: FlushContext, report: FlushReport, claim: Claim,
                       file_id: str) -> str:
    """Create the batch of `file_id`, retrying a failure only once the upstream's list shows
    that the failed try made no batch (a lost answer is not a batch not made)."""
    s = ctx.settings
    endpoint, model = split_queue(claim.model)
    policy = RetryPolicy(CREATE_ATTEMPTS - 1, s.retry_backoff_base_s, s.retry_backoff_max_s)
    attempt = 0
    first_asked = now() - CLOCK_SKEW_S
    while True:
        attempt += 1
        try:
            batch = ctx.upstream.with_options(max_retries=0).batches.create(
                input_file_id=file_id,
                endpoint=endpoint,
                completion_window=s.batch_completion_window,
                metadata={"flush_id": report.flush_id, "claim_id": claim.claim_id,
                          "model": model[:256], "source": "hybrid-router"},
            )
            if attempt > 1:  # a failed try may yet be made upstream: watch for it
                watch_file(ctx.client, ctx.keys, file_id, str(batch.id), first_asked)
            return str(batch.id)
        except UPSTREAM_ERRORS as exc:
            made = batches_made_from(ctx.upstream, {file_id}, first_asked)
            if made:
                kept = str(made[file_id][0].id)
                log.warning("batch create failed but the batch was made", model=claim.model,
                            batch_id=kept, error=str(exc)[:300])
                watch_file(ctx.client, ctx.keys, file_id, kept, first_asked)
                return kept
            if not (is_retryable(exc) and policy.allows(attempt)):
                raise
            delay = policy.backoff(attempt, retry_after_seconds(exc))
            log.warning("batch create failed; trying again", model=claim.model,
                        attempt=attempt, delay_s=round(delay, 2), error=str(exc)[:300])
            time.sleep(delay)


def _submit_emulated(ctx: FlushContext, lock: RedisLock, claim: Claim,
                     part: JsonlPart) -> tuple[str, str]:
    """Record an emulated batch of the part (the batch worker then runs its lines itself);
    the lock is asked for first, as before a native batch is made (see `_submit_native`)."""
    _require_lock(lock, f"before an emulated batch of {claim.model} was recorded")
    batch_id = f"emu_{uuid.uuid4().hex}"
    endpoint, model = split_queue(claim.model)
    record_batch(ctx.client, ctx.settings, batch_id, model, "emulated", len(part.ids),
                 flush_id=claim.claim_id, endpoint=endpoint)
    return batch_id, ""
