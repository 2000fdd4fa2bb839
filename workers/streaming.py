"""Running one stream: claim it, call the upstream once, relay every token, end it for sure.

`stream_request(request_id, rt)` is the whole stream lane for one request, a coroutine on the
process's stream engine loop (`workers.stream_engine`). `run_stream(request_id, ctx)` runs it
there from any thread and waits: the Celery task is a thin wrapper around it, and tests call it
directly against the simulator.

- **Exactly once**: `workers.stream_claim.claim` (lease + state machine) decides whether this
  delivery may call the upstream at all.
- **Relay**: each content delta, and each chunk's tool-call deltas (``tool_calls`` events, kept
  whole for the result's message), go to the shared `StreamPublisher` (replay log + pub/sub in
  one guarded script); the publisher marks the stream `stopped` once the request is terminal
  (cancelled), and the next delta closes the upstream response, so no more tokens are paid for.
- **Retries** before the first token (connection errors, 429 with its ``retry-after``, 5xx):
  exponential backoff with jitter (`workers.retry.RetryPolicy`); nothing reaches subscribers.
- **Resume** after a drop mid-stream: the request is sent again with the text so far as an
  assistant prefill, and only the new deltas are relayed, so subscribers see one unbroken
  sequence. Resumes count against the same retry budget. A stream that has relayed tool-call
  deltas is not resumed (a prefill cannot continue a call): it fails, retryable by the client.
- **Timeouts** are enforced here (Celery's time limits do not reach the engine): the idle
  timeout is the httpx read timeout between chunks, the total timeout is checked at every chunk.
- **End**: `completed` with the result, usage and cost (and the ``done`` event) in one
  transition; or `failed` with an ``error`` event and the partial content; or, when cancelled,
  the tokens already paid for are written to the cancelled record. The run's ledger and timing
  increments and its lease go in the same script as that record write (`RunEnd`), so the
  record's cost and the ledger agree whatever dies when.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import httpx
import openai

from router import events as ev
from router.ledger import add_to_ledger, ledger_increments
from router.logs import get_logger
from router.lua import END_STREAM_RUN_SCRIPT
from router.metrics import queue_timing
from router.pricing import estimate_prompt_tokens
from router.records import RequestRecord, Status, now
from router.store import RunEnd
from router.tool_calls import ToolCalls
from workers.retry import is_retryable, retry_after_seconds
from workers.stream_claim import aclaim
from workers.stream_context import StreamContext
from workers.stream_publisher import PublishError, StreamHandle
from workers.stream_runtime import StreamRuntime
from workers.upstream import upstream_answer
from workers.upstream_sse import TIMEOUT_ERRORS, TRANSPORT_ERRORS

log = get_logger(__name__)

RunOutcome = Literal[
    "completed", "failed", "cancelled", "duplicate", "terminal", "missing", "worker_lost"
]
FLUSH_TIMEOUT_S = 10.0
# How long a run's ledger marker lives. A run's end is repeated only by the same run, within
# seconds (a write retried for ~5 s, an end written again after a later error); ten minutes
# is far beyond that and keeps the markers few (one per stream for ten minutes).
ACCOUNTED_TTL_S = 600


class StreamDropped(Exception):
    """The upstream ended the stream without a finish reason (connection cut short)."""


class _Stopped(Exception):
    """The request became terminal while streaming (cancelled): stop reading."""


class _TotalTimeout(Exception):
    """The stream ran longer than `Settings.stream_total_timeout_s`."""


@dataclass
class UsageTally:
    """Tokens paid for across every upstream attempt of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    def add(self, usage: dict[str, Any] | None, messages: list[dict[str, Any]],
            tokens_received: int) -> None:
        """Add one attempt: the upstream's usage if it sent one, else an estimate."""
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        elif tokens_received:
            self.prompt_tokens += estimate_prompt_tokens(messages)
            self.completion_tokens += tokens_received
            self.estimated = True

    @property
    def paid(self) -> bool:
        """Whether any attempt of this run was charged for (so it has a cost to record)."""
        return bool(self.prompt_tokens or self.completion_tokens)

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class StreamState:
    """What one request's stream has produced so far, across attempts."""

    record: RequestRecord
    handle: StreamHandle
    pieces: list[str] = field(default_factory=list)
    tool_calls: ToolCalls = field(default_factory=ToolCalls)
    finish_reason: str | None = None
    first_token_at: float | None = None
    usage: UsageTally = field(default_factory=UsageTally)
    released: bool = False  # the lease went back with the ledger write
    # Names this run in its ledger write's marker (`Keys.accounted`): its cost counts once.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def content(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retryable: bool


def run_stream(request_id: str, ctx: StreamContext) -> RunOutcome:
    """Stream `request_id` on the process's engine and wait for the outcome (any thread)."""
    return ctx.engine.run(request_id)


async def stream_request(request_id: str, rt: StreamRuntime) -> RunOutcome:
    """Stream `request_id` if this delivery wins the claim; always leaves it terminal."""
    claimed, record = await aclaim(request_id, rt.ctx, rt.store)
    if claimed != "claimed":
        return claimed
    handle = rt.publisher.open(request_id)
    state: StreamState | None = None
    try:
        if record is None:
            return "missing"
        state = StreamState(record, handle)
        try:
            return await _stream(state, rt)
        except Exception as exc:  # never leave a claimed request streaming
            log.exception("stream crashed", request_id=request_id)
            return await _end_failed(state, rt, Failure("internal_error",
                                                        f"stream worker error: {exc}", True))
    finally:
        rt.publisher.close(handle)
        if state is None or not state.released:
            await _end_run(request_id, rt, state.run_id if state is not None else "-")


class _Increments:
    """Collects the HINCRBYs that `add_to_ledger` and `queue_timing` would queue on a pipeline,
    as a run's end (`RunEnd`) takes them: the hashes (its keys from the fourth on) and, per
    increment, the hash's position among those keys, the field and the amount."""

    FIRST_KEY = 4  # positions 1..3 are the marker, the lease and the running index

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.triples: list[Any] = []

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        if name not in self.hashes:
            self.hashes.append(name)
        self.triples += [self.FIRST_KEY + self.hashes.index(name), key, amount]


def _run_end(request_id: str, rt: StreamRuntime, run_id: str,
             increments: _Increments | None = None) -> RunEnd:
    """This run's end: the lease back, out of the running index, `increments` added once."""
    incs = increments or _Increments()
    return RunEnd([rt.keys.accounted(request_id, run_id), rt.keys.lease(request_id),
                   rt.keys.streaming(), *incs.hashes],
                  [rt.ctx.leases.owner, request_id, ACCOUNTED_TTL_S, *incs.triples])


async def _end_run(request_id: str, rt: StreamRuntime, run_id: str) -> None:
    """End a run that wrote no end of its own (it crashed, or lost its claim): one script,
    one round trip, safe to repeat."""
    rt.ctx.leases.forget(request_id)
    end = _run_end(request_id, rt, run_id)
    await rt.store.scripts.run(END_STREAM_RUN_SCRIPT, end.keys, end.args)


def _upstream_request(state: StreamState) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The body of the next attempt: the original, plus the text so far as a prefill."""
    body = dict(state.record.body)
    messages: list[dict[str, Any]] = list(body.pop("messages"))
    if state.pieces:
        messages.append({"role": "assistant", "content": state.content})
        for cap in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(cap), int):
                body[cap] = max(1, body[cap] - len(state.pieces))
    return body, messages


async def _stream(state: StreamState, rt: StreamRuntime) -> RunOutcome:
    settings = rt.settings
    policy = rt.ctx.policy
    request_id = state.record.id
    deadline = time.monotonic() + settings.stream_total_timeout_s
    timeout = httpx.Timeout(settings.upstream_timeout_s, read=settings.stream_idle_timeout_s)
    retries = 0
    first_attempt = True  # the claim has just seen the request dispatched, not terminal
    while True:
        if not first_attempt and await _is_terminal(request_id, rt):
            return await _end_stopped(state, rt)
        first_attempt = False
        body, messages = _upstream_request(state)
        body.update(messages=messages, stream=True, stream_options={"include_usage": True})
        received = 0
        usage: dict[str, Any] | None = None
        state.finish_reason = None
        try:
            async with rt.upstream.stream(body, timeout) as chunks:
                async for chunk in chunks:
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = choice.get("delta")
                        text = delta.get("content") if delta else None
                        if text:
                            if state.first_token_at is None:
                                state.first_token_at = now()
                            state.pieces.append(text)
                            received += 1
                            rt.publisher.publish(state.handle, text)
                        calls = delta.get("tool_calls") if delta else None
                        if calls and isinstance(calls, list):
                            if state.first_token_at is None:
                                state.first_token_at = now()
                            state.tool_calls.add(calls)
                            received += 1
                            rt.publisher.publish(state.handle, calls)
                        if choice.get("finish_reason"):
                            state.finish_reason = choice["finish_reason"]
                    if state.handle.stopped:
                        raise _Stopped
                    if time.monotonic() > deadline:
                        raise _TotalTimeout
            if state.finish_reason is None:
                raise StreamDropped("the upstream stream ended without a finish reason")
            state.usage.add(usage, messages, received)
            return await _end_completed(state, rt)
        except _Stopped:
            state.usage.add(usage, messages, received)
            return await _end_stopped(state, rt)
        except _TotalTimeout:
            state.usage.add(usage, messages, received)
            return await _end_failed(state, rt, Failure(
                "timeout", f"the stream ran longer than {settings.stream_total_timeout_s:g}s "
                "(ROUTER_STREAM_TOTAL_TIMEOUT_S); the partial content is kept", False))
        except PublishError as exc:
            state.usage.add(usage, messages, received)
            return await _end_failed(state, rt, Failure("publish_failed", str(exc), True))
        except Exception as exc:
            state.usage.add(usage, messages, received)
            failure = _classify(exc, bool(state.pieces or state.tool_calls))
            if state.tool_calls and failure.retryable:
                failure = Failure(failure.code, f"{failure.message} (tool calls were relayed, "
                                  "so the stream cannot be resumed; submit it again)", True)
                return await _end_failed(state, rt, failure)
            if failure.retryable and policy.allows(retries + 1):
                retries += 1
                delay = policy.backoff(retries, retry_after_seconds(exc))
                log.warning("upstream attempt failed; retrying", request_id=request_id,
                            retry=retries, delay_s=round(delay, 3), error=failure.message,
                            resume_from_chars=len(state.content))
                await asyncio.sleep(delay)
                continue
            if failure.retryable:
                failure = Failure(failure.code, f"{failure.message} (gave up after {retries} "
                                  f"retries)", True)
            return await _end_failed(state, rt, failure)


def _classify(exc: BaseException, mid_stream: bool) -> Failure:
    """Turn an upstream exception into an error code, message and whether to retry."""
    if isinstance(exc, openai.APIStatusError):
        return Failure(f"upstream_{exc.status_code}", upstream_answer(exc), is_retryable(exc))
    if isinstance(exc, (StreamDropped, *TRANSPORT_ERRORS)):
        where = "mid-stream" if mid_stream else "before the first token"
        if isinstance(exc, TIMEOUT_ERRORS):
            code = "upstream_timeout"
        else:
            code = "stream_interrupted" if mid_stream else "upstream_unavailable"
        return Failure(code, f"upstream connection failed {where}: {exc or type(exc).__name__}",
                       True)
    if isinstance(exc, openai.APIError):  # an error object inside the stream
        return Failure("upstream_error", f"upstream error: {exc.message}", True)
    raise exc


async def _is_terminal(request_id: str, rt: StreamRuntime) -> bool:
    status: Any = await rt.redis.hget(rt.keys.record(request_id), "status")
    return status is None or status in (b"completed", b"failed", b"cancelled")


async def _flush(state: StreamState, rt: StreamRuntime) -> None:
    await rt.publisher.flush(state.handle, FLUSH_TIMEOUT_S)


def _cost_fields(state: StreamState, rt: StreamRuntime) -> tuple[Decimal, dict[str, int],
                                                                dict[str, Any]]:
    usage = state.usage.as_dict()
    cost, increments = ledger_increments(rt.settings, "stream", state.record.model, usage)
    fields: dict[str, Any] = {
        "usage": usage,
        "cost_usd": str(cost),
        "first_token_at": state.first_token_at,
        "content_tokens_relayed": len(state.pieces),
    }
    return cost, increments, fields


def _ending(rt: StreamRuntime, state: StreamState, increments: dict[str, int],
            finished: RequestRecord | None = None) -> RunEnd:
    """The run's end that goes with the record's last write: the cost into the ledger and,
    for a request this worker ended, its latencies, in the same script as the record's usage
    and cost, so the two never disagree whatever dies when."""
    incs = _Increments()
    add_to_ledger(incs, rt.keys, increments)
    if finished is not None:
        queue_timing(incs, rt.keys, finished)
    return _run_end(state.record.id, rt, state.run_id, incs)


def _ended(rt: StreamRuntime, state: StreamState) -> None:
    """The run's end was written with the record: its lease is no longer this worker's."""
    rt.ctx.leases.forget(state.record.id)
    state.released = True


def _finished_record(state: StreamState, status: Status, finished_at: float) -> RequestRecord:
    return state.record.model_copy(update={
        "status": status, "finished_at": finished_at, "first_token_at": state.first_token_at,
    })


async def _notify(state: StreamState, rt: StreamRuntime) -> None:
    """Schedule the terminal callback (a Celery publish: sync, so in a thread)."""
    if state.record.callback_url:
        try:
            await asyncio.get_running_loop().run_in_executor(None, rt.ctx.notify, state.record.id)
        except Exception:  # the request is terminal either way; the callback is best effort
            log.exception("scheduling the terminal callback failed", request_id=state.record.id)


async def _end_completed(state: StreamState, rt: StreamRuntime) -> RunOutcome:
    await _flush(state, rt)
    if state.handle.stopped:
        return await _end_stopped(state, rt)
    cost, increments, fields = _cost_fields(state, rt)
    content = state.content
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if state.tool_calls:
        message = {"role": "assistant", "content": content or None,
                   "tool_calls": state.tool_calls.calls()}
    fields["result"] = {
        "content": content,
        "finish_reason": state.finish_reason,
        "usage": fields["usage"],
        "message": message,
    }
    fields["finished_at"] = finished_at = now()
    outcome = await rt.store.transition(
        state.record.id, "completed", allowed_from=["streaming"], fields=fields,
        event=ev.done(state.finish_reason, fields["usage"], cost, len(content)),
        run_end=_ending(rt, state, increments,
                        _finished_record(state, "completed", finished_at)),
    )
    if not outcome.moved:  # cancelled (or swept) between the last token and now
        return await _end_stopped(state, rt)
    _ended(rt, state)
    await _notify(state, rt)
    log.info("stream completed", request_id=state.record.id, chars=len(content),
             events=state.handle.events_published, cost_usd=str(cost))
    return "completed"


async def _end_failed(state: StreamState, rt: StreamRuntime, failure: Failure) -> RunOutcome:
    with contextlib.suppress(PublishError):
        await _flush(state, rt)
    _cost, increments, fields = _cost_fields(state, rt)
    fields["error"] = {"code": failure.code, "message": failure.message,
                       "retryable": failure.retryable}
    if state.pieces:
        fields["result"] = {"content": state.content, "finish_reason": None}
    fields["finished_at"] = finished_at = now()
    outcome = await rt.store.transition(
        state.record.id, "failed", allowed_from=["streaming"], fields=fields,
        event=ev.error(failure.code, failure.message, failure.retryable),
        run_end=_ending(rt, state, increments if state.usage.paid else {},
                        _finished_record(state, "failed", finished_at)),
    )
    if not outcome.moved:
        return await _end_stopped(state, rt)
    _ended(rt, state)
    await _notify(state, rt)
    log.warning("stream failed", request_id=state.record.id, code=failure.code,
                error=failure.message)
    return "failed"


async def _end_stopped(state: StreamState, rt: StreamRuntime) -> RunOutcome:
    """The request became terminal under us (cancelled): record what was paid for."""
    _cost, increments, fields = _cost_fields(state, rt)
    if state.usage.paid:
        await rt.store.annotate(state.record.id, fields, _ending(rt, state, increments))
        _ended(rt, state)
    log.info("stream stopped: request is terminal", request_id=state.record.id,
             tokens_paid=state.usage.completion_tokens)
    return "cancelled"
