"""Emulated batches, for upstreams without a Batch API: the batch worker runs the requests of
an (internal) batch as ordinary non-streaming calls of the batch's endpoint, at most
`Settings.emulated_concurrency` at a time, and writes them back exactly like a native batch
(priced at the standard rate, since nothing was discounted)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import openai
import redis

from hybrid_router.router.core.endpoints import CHAT, EMBEDDINGS, result_from_body, upstream_path
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import now
from hybrid_router.router.core.redis_text import text
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from hybrid_router.workers.batch.poll import batch_meta, finish_batch
from hybrid_router.workers.batch.writeback import (
    BatchWriter,
    LineOutcome,
    Notify,
    WritebackReport,
    no_notify,
)
from hybrid_router.workers.retry import RetryPolicy, is_retryable, retry_after_seconds

log = get_logger(__name__)

WRITE_EVERY = 50


def _call(upstream: openai.OpenAI, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """One plain call of `endpoint` with `body`: the upstream's answer as JSON."""
    if endpoint == CHAT:
        extra = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        completion = upstream.chat.completions.create(
            model=body["model"], messages=body["messages"], extra_body=extra or None,
        )
        return completion.model_dump(mode="json")
    # Responses and embeddings as sent (no SDK defaults added, e.g. base64 embeddings).
    sent = body if endpoint == EMBEDDINGS else {**body, "stream": False}
    answer: dict[str, Any] = upstream.post(upstream_path(endpoint), body=sent,
                                           cast_to=dict[str, Any])
    return answer


def complete_one(upstream: openai.OpenAI, policy: RetryPolicy, request_id: str,
                 body: dict[str, Any], endpoint: str = CHAT) -> LineOutcome:
    """One ordinary call of `endpoint` with the shared retry policy, as a write-back outcome."""
    attempt = 0
    while True:
        try:
            answer = _call(upstream, endpoint, body)
        except openai.OpenAIError as exc:
            attempt += 1
            if is_retryable(exc) and policy.allows(attempt):
                time.sleep(policy.backoff(attempt, retry_after_seconds(exc)))
                continue
            status = getattr(exc, "status_code", None)
            return LineOutcome(request_id, False,
                               error_code=f"upstream_{status}" if status else "upstream_error",
                               error_message=str(exc)[:500], retryable=is_retryable(exc))
        result, usage = result_from_body(answer)
        return LineOutcome(request_id, True, result, usage)


def _bodies(client: redis.Redis, keys: Keys, batch_id: str
            ) -> Iterator[tuple[str, dict[str, Any]]]:
    import orjson

    ids = [text(m) for m in client.smembers(keys.batch_requests(batch_id))]
    for row in batch_claim.fetch_rows(client, keys, ids):
        if row.status == "submitted" and row.body_json is not None:
            yield row.id, orjson.loads(row.body_json)


def run_emulated_batch(settings: Settings, client: redis.Redis, upstream: openai.OpenAI,
                       batch_id: str, *, notify: Notify = no_notify) -> WritebackReport:
    """Run every still-submitted request of `batch_id`, write results, end the batch."""
    keys = Keys(settings.key_prefix)
    meta = batch_meta(client, keys, batch_id)
    report = WritebackReport()
    if not meta or meta.get("mode") != "emulated":
        log.warning("not an emulated batch; nothing to run", batch_id=batch_id)
        return report
    endpoint = meta.get("endpoint") or CHAT
    writer = BatchWriter(client, settings, batch_id, meta.get("model") or "", emulated=True,
                         notify=notify, endpoint=endpoint)
    policy = RetryPolicy.from_settings(settings)
    buffer: list[LineOutcome] = []
    pending: set[Future[LineOutcome]] = set()
    limit = settings.emulated_concurrency

    def drain(block_until_below: int) -> None:
        nonlocal pending
        while len(pending) > block_until_below:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            buffer.extend(f.result() for f in done)
        if len(buffer) >= WRITE_EVERY or (block_until_below == 0 and buffer):
            report.add(writer.write(list(buffer)))
            buffer.clear()
            client.hset(keys.batch(batch_id), "heartbeat_at", repr(now()))

    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="emulated") as pool:
        for request_id, body in _bodies(client, keys, batch_id):
            pending.add(pool.submit(complete_one, upstream, policy, request_id, body, endpoint))
            drain(limit - 1)
        drain(0)
    # Anything still submitted here got no outcome (cannot normally happen): requeue it.
    missing = [rid for rid, _ in _bodies(client, keys, batch_id)]
    if missing:
        report.add(writer.requeue([(m, "missing_result", "the emulated batch produced no "
                                    "result for this request") for m in missing]))
    finish_batch(client, settings, batch_id, "completed")
    log.info("emulated batch done", batch_id=batch_id, completed=report.completed,
             failed=report.failed, requeued=report.requeued)
    return report
