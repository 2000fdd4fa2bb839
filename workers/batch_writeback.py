"""Writing batch results back to their requests, exactly once each.

Every result goes through one script (`FINISH`) that moves the request to its terminal state
*and* adds its cost to the ledger, both only if the request was still `submitted`; a line seen
twice (a poll that runs twice, a retried task) changes nothing and is counted once. A request
that got no usable line goes back to its queue (`REQUEUE`) or fails after its attempts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis

from router import events as ev
from router.keys import Keys
from router.ledger import ledger_increments
from router.logs import get_logger
from router.records import dumps, now
from settings import Settings
from workers.batch_lua import FINISH_SCRIPT, REQUEUE_SCRIPT, run_pipelined
from workers.retry import RETRYABLE_STATUS

log = get_logger(__name__)

WRITE_CHUNK = 500
# Per-line error codes the Batch API uses for lines it never ran: always worth another batch.
SKIPPED_LINE_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})

Notify = Callable[[str], None]


def no_notify(_request_id: str) -> None:
    """A `Notify` that does nothing (requests without callbacks, unit tests)."""


@dataclass(frozen=True)
class LineOutcome:
    """What one output/error line (or one emulated call) says about one request."""

    request_id: str
    ok: bool
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error_code: str = ""
    error_message: str = ""
    retryable: bool = False


@dataclass
class WritebackReport:
    completed: int = 0
    failed: int = 0
    requeued: int = 0
    unchanged: int = 0
    seen: set[str] = field(default_factory=set)

    def add(self, other: WritebackReport) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.requeued += other.requeued
        self.unchanged += other.unchanged
        self.seen |= other.seen


def result_from_completion(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The record's `result` and `usage` from a chat.completion body."""
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = message.get("content") or ""
    usage = body.get("usage")
    result = {
        "content": content,
        "finish_reason": choice.get("finish_reason"),
        "usage": usage,
        "message": message,
    }
    return result, usage


def parse_line(obj: dict[str, Any]) -> LineOutcome | None:
    """One line of a batch output or error file (None when it names no request)."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None
    response = obj.get("response") or None
    error = obj.get("error") or None
    status = int(response.get("status_code") or 0) if isinstance(response, dict) else 0
    if status == 200 and isinstance(response, dict) and isinstance(response.get("body"), dict):
        result, usage = result_from_completion(response["body"])
        return LineOutcome(custom_id, True, result, usage)
    if isinstance(response, dict) and status:
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        err = (body or {}).get("error") or {}
        return LineOutcome(
            custom_id, False,
            error_code=str(err.get("code") or err.get("type") or f"upstream_{status}"),
            error_message=str(err.get("message") or f"upstream answered {status}"),
            retryable=status in RETRYABLE_STATUS,
        )
    err = error if isinstance(error, dict) else {}
    code = str(err.get("code") or "batch_line_error")
    return LineOutcome(
        custom_id, False, error_code=code,
        error_message=str(err.get("message") or "the batch returned no response for this line"),
        retryable=code in SKIPPED_LINE_CODES or not err,
    )


class BatchWriter:
    """Writes outcomes of one batch (id, model, mode) to its requests."""

    def __init__(self, client: redis.Redis, settings: Settings, batch_id: str, model: str,
                 *, emulated: bool = False, notify: Notify = no_notify) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.batch_id = batch_id
        self.model = model
        self.emulated = emulated
        self.notify = notify

    # --- building one script call ----------------------------------------------------------
    def _event_args(self, request_id: str) -> list[Any]:
        s = self.settings
        return [self.keys.channel(request_id), s.replay_maxlen, s.replay_ttl_s]

    def _finish_call(self, out: LineOutcome) -> tuple[list[str], list[Any]]:
        k, rid = self.keys, out.request_id
        keys = [k.record(rid), k.seq(rid), k.events(rid), k.ledger()]
        finished = now()
        if out.ok:
            cost, increments = ledger_increments(self.settings, "batch", self.model, out.usage,
                                                 emulated=self.emulated)
            result = out.result or {}
            content = str(result.get("content") or "")
            event = ev.done(result.get("finish_reason"), out.usage, cost, len(content))
            ledger: list[Any] = []
            for name, amount in increments.items():
                if amount:
                    ledger += [name, amount]
            fields = ["result", dumps(result), "cost_usd", str(cost), "finished_at",
                      repr(finished)]
            if out.usage:
                fields += ["usage", dumps(out.usage)]
            return keys, ["submitted", "completed", *self._event_args(rid),
                          self.settings.result_ttl_s, event, len(ledger) // 2, *ledger, *fields]
        error = {"code": out.error_code, "message": out.error_message, "retryable": False}
        event = ev.error(out.error_code, out.error_message, False)
        return keys, ["submitted", "failed", *self._event_args(rid), self.settings.result_ttl_s,
                      event, 0, "error", dumps(error), "finished_at", repr(finished)]

    def _requeue_call(self, request_id: str, code: str, message: str
                      ) -> tuple[list[str], list[Any]]:
        k = self.keys
        error = {"code": code, "message": message, "retryable": False}
        return (
            [k.record(request_id), k.seq(request_id), k.events(request_id),
             k.pending(self.model), k.pending_models()],
            [self.batch_id, self.settings.batch_max_attempts, *self._event_args(request_id),
             self.settings.result_ttl_s, repr(now()),
             ev.queued(None, f"{code}: {message}"[:300]),
             ev.error(code, f"{message} (gave up after {self.settings.batch_max_attempts} "
                      "attempts)", False),
             dumps(error), request_id, self.model],
        )

    # --- writing ---------------------------------------------------------------------------
    def write(self, outcomes: Iterable[LineOutcome], chunk: int = WRITE_CHUNK) -> WritebackReport:
        """Apply outcomes: results and final errors finish, retryable errors requeue."""
        report = WritebackReport()
        buffer: list[LineOutcome] = []
        for out in outcomes:
            buffer.append(out)
            if len(buffer) >= chunk:
                report.add(self._write_chunk(buffer))
                buffer = []
        if buffer:
            report.add(self._write_chunk(buffer))
        return report

    def _write_chunk(self, outcomes: Sequence[LineOutcome]) -> WritebackReport:
        report = WritebackReport(seen={o.request_id for o in outcomes})
        finals = [o for o in outcomes if o.ok or not o.retryable]
        retries = [o for o in outcomes if not o.ok and o.retryable]
        answers = run_pipelined(self.client, FINISH_SCRIPT,
                                [self._finish_call(o) for o in finals])
        for out, raw in zip(finals, answers, strict=True):
            if int(raw[0]) == 1:
                if out.ok:
                    report.completed += 1
                else:
                    report.failed += 1
                if raw[2]:
                    self.notify(out.request_id)
            else:
                report.unchanged += 1
        report.requeued, failed = self._requeue(
            [(o.request_id, o.error_code, o.error_message) for o in retries], report)
        report.failed += failed
        return report

    def requeue(self, items: Sequence[tuple[str, str, str]]) -> WritebackReport:
        """Send `(request_id, code, message)` back to the queue (or fail them when exhausted)."""
        report = WritebackReport(seen={i[0] for i in items})
        requeued, failed = 0, 0
        for start in range(0, len(items), WRITE_CHUNK):
            r, f = self._requeue(items[start:start + WRITE_CHUNK], report)
            requeued += r
            failed += f
        report.requeued, report.failed = requeued, failed
        return report

    def _requeue(self, items: Sequence[tuple[str, str, str]], report: WritebackReport
                 ) -> tuple[int, int]:
        answers = run_pipelined(self.client, REQUEUE_SCRIPT,
                                [self._requeue_call(*item) for item in items])
        requeued = failed = 0
        for (request_id, _code, _msg), raw in zip(items, answers, strict=True):
            code = int(raw[0])
            if code == 1:
                requeued += 1
            elif code == 2:
                failed += 1
                if raw[1]:
                    self.notify(request_id)
            else:
                report.unchanged += 1
        return requeued, failed


def cost_of(settings: Settings, model: str, usage: dict[str, Any] | None,
            emulated: bool = False) -> Decimal:
    """The price of one batch result (exposed for tests and reports)."""
    return ledger_increments(settings, "batch", model, usage, emulated=emulated)[0]
