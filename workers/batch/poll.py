"""The poll: follow each batch in flight and write its results back when it ends.

`completed`: every output and error line goes to its request (`BatchWriter`), then any member
that got no line is requeued. `failed` / `expired` / `cancelled`: the partial results are kept
the same way and every member still `submitted` in this batch is requeued (or fails after
`batch_max_attempts`) with the upstream's reason; a `failed` batch of several requests is split
instead, without using an attempt, to find the request at fault (`hybrid_router.workers.batch.split`). The
batch then leaves the in-flight set. All of it is idempotent, so a poll that runs twice (or
dies half-way and runs again) changes nothing the second time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import openai
import orjson
import redis

from hybrid_router.router.core.endpoints import CHAT
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.replay import compact_due
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lock import held
from hybrid_router.workers.batch.lua import FETCH_SCRIPT
from hybrid_router.workers.batch.split import SPLIT_STATUS, alone, halves, splits
from hybrid_router.workers.batch.writeback import (
    BatchWriter,
    LineOutcome,
    Notify,
    WritebackReport,
    no_notify,
    parse_line,
)
from hybrid_router.workers.deadlines import StreamDispatch, escalate_due

log = get_logger(__name__)

ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
EMULATED_STALE_MIN_S = 60.0

SendEmulated = Callable[[str], None]


@dataclass
class PollReport:
    ran: bool = True
    checked: int = 0
    finished: list[str] = field(default_factory=list)
    escalated: int = 0
    compacted: int = 0
    writeback: WritebackReport = field(default_factory=WritebackReport)


@dataclass
class PollContext:
    settings: Settings
    client: redis.Redis
    upstream: openai.OpenAI
    notify: Notify = no_notify
    dispatch_stream: StreamDispatch | None = None
    send_emulated: SendEmulated | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)


def batch_meta(client: redis.Redis, keys: Keys, batch_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in client.hgetall(keys.batch(batch_id)).items()}


def poll(ctx: PollContext) -> PollReport:
    """Check every batch in flight once; never two polls at a time."""
    report = PollReport()
    with held(ctx.client, ctx.keys.poll_lock(), ctx.settings.batch_lock_ttl_s) as lock:
        if lock is None:
            report.ran = False
            return report
        report.escalated = escalate_due(ctx.client, ctx.settings, ctx.dispatch_stream)
        for raw in ctx.client.zrange(ctx.keys.batches_in_flight(), 0, -1):
            batch_id = text(raw)
            report.checked += 1
            try:
                if check_batch(ctx, batch_id, report.writeback):
                    report.finished.append(batch_id)
            except (openai.OpenAIError, OSError) as exc:
                log.warning("batch poll failed; will retry next poll", batch_id=batch_id,
                            error=str(exc)[:300])
            lock.extend()
        # Finished requests past their replay grace period (hybrid_router.router.core.replay), as the stream
        # engines do: a deployment without a stream worker compacts too.
        report.compacted = compact_due(ctx.client, ctx.settings)
    return report


def check_batch(ctx: PollContext, batch_id: str, into: WritebackReport | None = None) -> bool:
    """Look at one batch; when it has ended, write it back and take it out of flight."""
    meta = batch_meta(ctx.client, ctx.keys, batch_id)
    if meta.get("mode") == "emulated":
        _resend_if_stale(ctx, batch_id, meta)
        return False
    try:
        batch: Any = ctx.upstream.batches.retrieve(batch_id)
    except openai.NotFoundError:
        # The upstream no longer knows the batch (lost, or another account): nothing will
        # ever come back for it, so its requests go round again like a failed batch's.
        batch = SimpleNamespace(status="failed", output_file_id=None, error_file_id=None,
                                errors=SimpleNamespace(data=[SimpleNamespace(
                                    code="batch_not_found",
                                    message=f"the upstream does not know batch {batch_id}")]))
    status = str(batch.status)
    if status not in ENDED:
        # Status and progress (the upstream's request counts) for the operator's live view.
        counts = getattr(batch, "request_counts", None)
        seen = {"status": status}
        if counts is not None:
            seen["done_count"] = str(getattr(counts, "completed", 0) or 0)
            seen["failed_count"] = str(getattr(counts, "failed", 0) or 0)
        changed: dict[Any, Any] = {k: v for k, v in seen.items() if meta.get(k) != v}
        if changed:
            ctx.client.hset(ctx.keys.batch(batch_id), mapping=changed)
        return False
    report = write_back_batch(ctx, batch_id, meta.get("model") or "", batch,
                              meta.get("endpoint") or CHAT)
    if into is not None:
        into.add(report)
    finish_batch(ctx.client, ctx.settings, batch_id, status)
    log.info("batch written back", batch_id=batch_id, status=status,
             completed=report.completed, failed=report.failed, requeued=report.requeued,
             unchanged=report.unchanged, paid_after_cancel=report.paid_after_cancel)
    return True


def _reason(batch: Any) -> tuple[str, str]:
    status = str(batch.status)
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    if data:
        first = data[0]
        code = str(getattr(first, "code", None) or f"batch_{status}")
        return code, str(getattr(first, "message", None) or f"the batch {status}")
    if status == "completed":
        return "missing_result", "the batch completed without a line for this request"
    return f"batch_{status}", f"the upstream batch {status} before this request ran"


def write_back_batch(ctx: PollContext, batch_id: str, model: str, batch: Any,
                     endpoint: str = CHAT) -> WritebackReport:
    """Write every line of the batch's files, then requeue the members that got none."""
    writer = BatchWriter(ctx.client, ctx.settings, batch_id, model, notify=ctx.notify,
                         endpoint=endpoint)
    report = WritebackReport()
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            report.add(writer.write(_file_lines(ctx.upstream, str(file_id))))
    code, message = _reason(batch)
    missing = [m for m in _members(ctx.client, ctx.keys, batch_id) if m not in report.seen]
    if missing:
        # Each goes to the FRONT of the queue: newest first, so the oldest ends up in front.
        created: dict[str, float] = {}
        for start in range(0, len(missing), 1000):
            part = missing[start:start + 1000]
            values = FETCH_SCRIPT(ctx.client, [ctx.keys.record(m) for m in part], ["created_at"])
            created.update((rid, float(raw or 0)) for rid, raw in zip(part, values, strict=True))
        missing.sort(key=lambda rid: created[rid], reverse=True)
        items = [(m, code, message) for m in missing]
        status = str(batch.status)
        if splits(status, missing):  # not every request's fault: find the one that is
            report.add(writer.requeue(items, halves(batch_id, missing), charged=False))
        else:
            report.add(writer.requeue(items, alone(batch_id, missing)
                                      if status == SPLIT_STATUS else None))
    return report


def _members(client: redis.Redis, keys: Keys, batch_id: str) -> Iterator[str]:
    for raw in client.sscan_iter(keys.batch_requests(batch_id), count=5000):
        yield text(raw)


FILE_READ_CHUNK = 1 << 16


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream, without decoding it to text first (orjson reads bytes)."""
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def file_lines(upstream: openai.OpenAI, file_id: str) -> Iterator[bytes]:
    """The non-blank lines of an upstream file, streamed as bytes (orjson reads bytes)."""
    with upstream.files.with_streaming_response.content(file_id) as response:
        for line in _split_lines(response.iter_bytes(FILE_READ_CHUNK)):
            if line and not line.isspace():
                yield line


def _file_lines(upstream: openai.OpenAI, file_id: str) -> Iterator[LineOutcome]:
    """Parsed lines of an output or error file, streamed (a missing file yields nothing)."""
    try:
        for line in file_lines(upstream, file_id):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("unreadable batch line skipped", file_id=file_id)
                continue
            if isinstance(obj, dict):
                outcome = parse_line(obj)
                if outcome is not None:
                    yield outcome
    except openai.NotFoundError:
        log.warning("batch file missing", file_id=file_id)


def finish_batch(client: redis.Redis, settings: Settings, batch_id: str, status: str) -> None:
    """Take a batch out of flight; its hash and member set expire with the results."""
    keys = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=True)
    pipe.zrem(keys.batches_in_flight(), batch_id)
    pipe.hset(keys.batch(batch_id), mapping={"status": status, "finished_at": repr(now())})
    pipe.expire(keys.batch(batch_id), settings.result_ttl_s)
    pipe.expire(keys.batch_requests(batch_id), settings.result_ttl_s)
    pipe.execute()


def _resend_if_stale(ctx: PollContext, batch_id: str, meta: dict[str, str]) -> None:
    """An emulated batch whose runner went quiet (worker died) is sent to a runner again."""
    stale_after = max(EMULATED_STALE_MIN_S, 2 * ctx.settings.upstream_timeout_s)
    beat = float(meta.get("heartbeat_at") or 0)
    if ctx.send_emulated is not None and time.time() - beat > stale_after:
        ctx.client.hset(ctx.keys.batch(batch_id), "heartbeat_at", repr(now()))
        log.warning("emulated batch stale; sent again", batch_id=batch_id)
        ctx.send_emulated(batch_id)
