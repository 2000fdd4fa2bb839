"""The ``/v1/batches`` lifecycle, computed lazily from timestamps.

A batch moves ``validating`` → ``in_progress`` → ``finalizing`` → ``completed`` over
``turnaround`` seconds (or ``failed`` / ``expired`` / ``cancelling`` → ``cancelled``). Nothing runs
in the background: the state is derived from the clock whenever a batch is read, and the output
and error files are written once, when a read first sees a terminal state. The input file is
validated and every line's fate decided at creation, so the outcome does not depend on when (or
how often) the client polls.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from hybrid_router.simulator.chat import request_id
from hybrid_router.simulator.config import SimConfig
from hybrid_router.simulator.directives import Directives
from hybrid_router.simulator.endpoints import ENDPOINTS, answer_line, line_directives, line_problem
from hybrid_router.simulator.errors import SimError, invalid_request, not_found
from hybrid_router.simulator.faults import Faults
from hybrid_router.simulator.files import FileStore, page

SUPPORTED_ENDPOINTS = ENDPOINTS
MAX_ERRORS = 100
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})

# Shares of the turnaround spent validating and (cumulatively) in progress.
VALIDATING_SHARE = 0.1
IN_PROGRESS_END_SHARE = 0.8


@dataclass(slots=True)
class Line:
    """One valid request line and what will happen to it."""

    custom_id: str
    body: dict[str, Any]
    error_status: int | None  # per-line error status, None = success


@dataclass(slots=True)
class BatchRecord:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None
    created: float
    turnaround: float
    fate: str  # complete | expire | fail
    lines: list[Line]
    errors: list[dict[str, Any]]
    model: str | None
    status: str = "validating"
    cancel_requested: float | None = None
    stamps: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0,
                                                            "failed": 0})
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0,
                                                           "output_tokens": 0})

    def to_dict(self) -> dict[str, Any]:
        s = self.stamps
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": s.get("in_progress_at"),
            "expires_at": int(self.created) + 24 * 3600,
            "finalizing_at": s.get("finalizing_at"),
            "completed_at": s.get("completed_at"),
            "failed_at": s.get("failed_at"),
            "expired_at": s.get("expired_at"),
            "cancelling_at": s.get("cancelling_at"),
            "cancelled_at": s.get("cancelled_at"),
            "request_counts": dict(self.counts),
            "usage": {
                "input_tokens": self.usage["input_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.usage["output_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage["input_tokens"] + self.usage["output_tokens"],
            },
            "metadata": self.metadata,
        }


def _err(code: str, message: str, line: int | None = None,
         param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def validate_input(
    data: bytes, endpoint: str, config: SimConfig
) -> tuple[list[tuple[str, dict[str, Any], Directives]], list[dict[str, Any]], Directives]:
    """Parse a batch input file the way OpenAI validates it.

    Returns the parsed lines (custom_id, body, directives), the validation errors and the
    directives that apply to the whole batch (the union of every line's directives).
    """
    errors: list[dict[str, Any]] = []
    lines: list[tuple[str, dict[str, Any], Directives]] = []
    batch_d = Directives()
    if len(data) > config.batch_max_bytes:
        errors.append(_err("file_too_large",
                           f"The batch input file is larger than the {config.batch_max_bytes} "
                           "byte maximum for the 'batch' purpose."))
        return lines, errors, batch_d
    raw_lines = data.split(b"\n")
    # Most files carry no directive: one shared empty (never mutated) Directives serves them.
    no_directives = Directives() if b"[[sim:" not in data else None
    seen: set[str] = set()
    model: str | None = None
    count = 0
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        count += 1
        if len(errors) >= MAX_ERRORS:
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(_err("invalid_json_line",
                               "This line is not parseable as valid JSON.", number))
            continue
        if not isinstance(obj, dict):
            errors.append(_err("invalid_request", "Each line must be a JSON object.", number))
            continue
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(_err("missing_required_parameter",
                               "Missing required parameter: 'custom_id'.", number, "custom_id"))
            continue
        if custom_id in seen:
            errors.append(_err("duplicate_custom_id",
                               "The custom_id for this request is a duplicate of another "
                               "request. The custom_id parameter must be unique for each "
                               "request in a batch.", number, "custom_id"))
            continue
        seen.add(custom_id)
        if obj.get("method") != "POST":
            errors.append(_err("invalid_method", "The method must be 'POST'.", number, "method"))
            continue
        if obj.get("url") != endpoint:
            errors.append(_err("invalid_url",
                               "The URL provided for this request does not match the batch "
                               "endpoint.", number, "url"))
            continue
        body = obj.get("body")
        problem = "The body must be a JSON object." if not isinstance(body, dict) \
            else line_problem(endpoint, body)
        if problem is not None or not isinstance(body, dict):
            errors.append(_err("invalid_request", problem or "", number, "body"))
            continue
        line_model = body.get("model")
        if not isinstance(line_model, str) or not line_model:
            errors.append(_err("missing_required_parameter",
                               "Missing required parameter: 'body.model'.", number, "body.model"))
            continue
        if model is None:
            model = line_model
        elif line_model != model:
            errors.append(_err("mismatched_model",
                               f"The provided model '{line_model}' does not match the model "
                               f"'{model}' of other requests in this batch. All requests in a "
                               "batch must use the same model.", number, "body.model"))
            continue
        d = no_directives or line_directives(endpoint, body)
        if d.batch is not None:
            batch_d.batch = d.batch
        if d.turnaround is not None:
            batch_d.turnaround = d.turnaround
        lines.append((custom_id, body, d))
    if count == 0:
        errors.append(_err("empty_file", "The batch input file is empty."))
    elif count > config.batch_max_lines:
        errors.append(_err("too_many_requests",
                           f"The batch input file contains {count} requests; the maximum is "
                           f"{config.batch_max_lines}."))
    return lines, errors, batch_d


class BatchStore:
    """Batches by id plus the machinery that finishes them."""

    def __init__(self, config: SimConfig, files: FileStore, faults: Faults) -> None:
        self.config = config
        self.files = files
        self.faults = faults
        self.batches: dict[str, BatchRecord] = {}

    # --- API ------------------------------------------------------------------------------------
    def create(self, params: dict[str, Any]) -> BatchRecord:
        input_file_id = params.get("input_file_id")
        endpoint = params.get("endpoint")
        window = params.get("completion_window")
        metadata = params.get("metadata")
        if not isinstance(input_file_id, str):
            raise invalid_request("Missing required parameter: 'input_file_id'.",
                                  "input_file_id", "missing_required_parameter")
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise invalid_request(f"Unsupported endpoint {endpoint!r}; this simulator batches "
                                  f"{', '.join(SUPPORTED_ENDPOINTS)}.", "endpoint",
                                  "invalid_value")
        if window != "24h":
            raise invalid_request("completion_window must be '24h'.", "completion_window",
                                  "invalid_value")
        if metadata is not None and not isinstance(metadata, dict):
            raise invalid_request("metadata must be an object.", "metadata", "invalid_type")
        f = self.files.get(input_file_id)
        if f.purpose != "batch":
            raise invalid_request(f"File {input_file_id} has purpose {f.purpose!r}; batch input "
                                  "files must have purpose 'batch'.", "input_file_id")
        parsed, errors, batch_d = validate_input(f.data, endpoint, self.config)
        fate = self.faults.batch_fate(batch_d)
        if fate == "fail" and not errors:
            errors.append(_err("simulated_validation_failure",
                               "The batch input file failed validation (simulated).", 1))
        if errors:
            fate = "fail"
        batch_id = "batch_" + secrets.token_hex(12)
        rng = random.Random(_seed(self.config.seed, batch_id))
        lines: list[Line] = []
        for custom_id, body, d in parsed:
            status = d.line_error
            if status is None and self.config.line_error_rate > 0 and \
                    rng.random() < self.config.line_error_rate:
                status = 500
            lines.append(Line(custom_id, body, status))
        turnaround = batch_d.turnaround if batch_d.turnaround is not None \
            else self.config.batch_turnaround_s
        rec = BatchRecord(
            id=batch_id, input_file_id=input_file_id, endpoint=endpoint,
            completion_window=window, metadata=metadata, created=time.time(),
            turnaround=turnaround, fate=fate, lines=lines, errors=errors,
            model=parsed[0][1].get("model") if parsed else None,
        )
        rec.counts["total"] = 0 if fate == "fail" else len(lines)
        self.batches[batch_id] = rec
        return rec

    def get(self, batch_id: str) -> BatchRecord:
        rec = self.batches.get(batch_id)
        if rec is None:
            raise not_found(f"No batch found with id '{batch_id}'.")
        self.refresh(rec)
        return rec

    def cancel(self, batch_id: str) -> BatchRecord:
        rec = self.get(batch_id)
        if rec.status in ("cancelling", "cancelled"):
            return rec
        if rec.status in TERMINAL or rec.status == "finalizing":
            raise SimError(400, f"Cannot cancel a batch with status '{rec.status}'.",
                           code="invalid_state")
        now = time.time()
        rec.cancel_requested = now
        rec.status = "cancelling"
        rec.stamps["cancelling_at"] = int(now)
        self.refresh(rec)
        return rec

    def list(self, limit: int, after: str | None) -> dict[str, Any]:
        recs = sorted(self.batches.values(), key=lambda r: r.created, reverse=True)
        for r in recs:
            self.refresh(r)
        return page([r.to_dict() for r in recs], limit, after)

    # --- lifecycle ------------------------------------------------------------------------------
    def _progress(self, rec: BatchRecord, at: float) -> int:
        """How many lines were processed by time ``at`` (linear over the in-progress window)."""
        start = rec.created + VALIDATING_SHARE * rec.turnaround
        end = rec.created + IN_PROGRESS_END_SHARE * rec.turnaround
        if at <= start:
            return 0
        if at >= end or end <= start:
            return len(rec.lines)
        return math.floor(len(rec.lines) * (at - start) / (end - start))

    def refresh(self, rec: BatchRecord, now: float | None = None) -> None:
        """Advance ``rec`` to the state its timestamps say it is in now."""
        if rec.status in TERMINAL:
            return
        now = time.time() if now is None else now
        t = rec.turnaround
        v_end = rec.created + VALIDATING_SHARE * t
        p_end = rec.created + IN_PROGRESS_END_SHARE * t
        end = rec.created + t
        if rec.cancel_requested is not None:
            if rec.cancel_requested >= v_end:
                rec.stamps.setdefault("in_progress_at", int(v_end))
            self._set_counts(rec, self._progress(rec, rec.cancel_requested))
            if now >= rec.cancel_requested + self.config.batch_cancel_s:
                done = self._progress(rec, rec.cancel_requested)
                self._finish(rec, "cancelled", done, "batch_cancelled",
                             "This request was not executed because the batch was cancelled.")
                rec.stamps["cancelled_at"] = int(now)
            return
        if now < v_end:
            rec.status = "validating"
            return
        if rec.fate == "fail":
            rec.status = "failed"
            rec.stamps["failed_at"] = int(v_end)
            return
        rec.stamps["in_progress_at"] = int(v_end)
        if rec.fate == "expire":
            if now < end:
                rec.status = "in_progress"
                self._set_counts(rec, self._progress(rec, now))
                return
            done = math.floor(len(rec.lines) * self.config.batch_expire_done_fraction)
            self._finish(rec, "expired", done, "batch_expired",
                         "This request could not be executed before the completion window "
                         "expired.")
            rec.stamps["expired_at"] = int(end)
            return
        if now < p_end:
            rec.status = "in_progress"
            self._set_counts(rec, self._progress(rec, now))
            return
        rec.stamps["finalizing_at"] = int(p_end)
        if now < end:
            rec.status = "finalizing"
            self._set_counts(rec, len(rec.lines))
            return
        self._finish(rec, "completed", len(rec.lines), "", "")
        rec.stamps["completed_at"] = int(end)

    def _set_counts(self, rec: BatchRecord, done: int) -> None:
        failed = sum(1 for ln in rec.lines[:done] if ln.error_status is not None)
        rec.counts.update(total=len(rec.lines), completed=done - failed, failed=failed)

    def _finish(self, rec: BatchRecord, status: str, done: int, skip_code: str,
                skip_message: str) -> None:
        """Write the output and error files and freeze the batch in ``status``."""
        created = int(rec.created + VALIDATING_SHARE * rec.turnaround)
        out: list[bytes] = []
        err: list[bytes] = []
        in_tok = out_tok = 0
        for i, ln in enumerate(rec.lines):
            line_id = "batch_req_" + secrets.token_hex(12)
            if i >= done:
                err.append(orjson.dumps({
                    "id": line_id, "custom_id": ln.custom_id, "response": None,
                    "error": {"code": skip_code, "message": skip_message},
                }))
                continue
            if ln.error_status is not None:
                e = SimError(ln.error_status)
                err.append(orjson.dumps({
                    "id": line_id, "custom_id": ln.custom_id,
                    "response": {"status_code": ln.error_status, "request_id": request_id(),
                                 "body": e.body()},
                    "error": None,
                }))
                continue
            answer_body, used_in, used_out = answer_line(rec.endpoint, ln.body, self.config,
                                                         created)
            in_tok += used_in
            out_tok += used_out
            out.append(orjson.dumps({
                "id": line_id, "custom_id": ln.custom_id,
                "response": {"status_code": 200, "request_id": request_id(),
                             "body": answer_body},
                "error": None,
            }))
        rng = random.Random(_seed(self.config.seed, rec.id + "/shuffle"))
        rng.shuffle(out)
        rng.shuffle(err)
        if out:
            rec.output_file_id = self.files.create(
                f"{rec.id}_output.jsonl", "batch_output", b"\n".join(out) + b"\n").id
        if err:
            rec.error_file_id = self.files.create(
                f"{rec.id}_error.jsonl", "batch_output", b"\n".join(err) + b"\n").id
        rec.counts.update(total=len(rec.lines), completed=len(out), failed=len(err))
        rec.usage.update(input_tokens=in_tok, output_tokens=out_tok)
        rec.status = status


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")
