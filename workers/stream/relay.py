"""Running one stream: claim it, call the upstream once, relay every token, end it for sure.

`stream_request(request_id, rt)` is the whole stream lane for one request, a coroutine on the
process's stream engine loop (`hybrid_router.workers.stream.engine`). `run_stream(request_id, ctx)` runs it
there from any thread and waits: the Celery task is a thin wrapper around it, and tests call it
directly against the simulator.

- **Exactly once**: `hybrid_router.workers.stream.claim.claim` (lease + state machine) decides whether this
  delivery may call the upstream at all.
- **Relay**: each content delta, and each chunk's tool-call deltas (``tool_calls`` events, kept
  whole for the result's message), go to the shared `StreamPublisher` (replay log + pub/sub in
  one guarded script); the publisher marks the stream `stopped` once the request is terminal
  (cancelled), and the next delta closes the upstream response, so no more tokens are paid for.
- **Endpoints** (`hybrid_router.router.core.endpoints`): a Responses request streams the upstream's Responses
  events, each relayed unchanged as a ``response`` event (never resumed once one was relayed:
  its ids and sequence numbers cannot be continued); an embeddings request is one plain call
  (`_embed`), retried like a stream's first attempt, whose answer ends the request.
- **Retries** before the first token (connection errors, 429 with its ``retry-after``, 5xx):
  exponential backoff with jitter (`hybrid_router.workers.retry.RetryPolicy`); nothing reaches subscribers.
- **Resume** after a drop mid-stream: the request is sent again with the text so far as an
  assistant prefill, and only the new deltas are relayed, so subscribers see one unbroken
  sequence. Resumes count against the same retry budget. A stream that has relayed tool-call
  deltas is not resumed (a prefill cannot continue a call): it fails, retryable by the client.
- **Timeouts** are enforced here (Celery's time limits do not reach the engine): the idle
  timeout is the httpx read timeout between chunks, the total timeout is checked at every chunk.
- **Worker lost**: a request whose worker died is claimed by a live engine (`stream_claim`),
  which rebuilds the text so far from the replay log and resumes it the same way, so
  subscribers see one unbroken sequence; the dead run's tokens are paid for as an estimate.
- **Redis outages** are ridden out for `Settings.stream_redis_grace_s`: tokens wait in the
  publisher, every store write is retried (each is safe to repeat); a stream that cannot write
  its end leaves its request ``streaming`` in the running index, for the sweep to resume.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, TypeVar, cast

import httpx
import openai
import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.endpoints import (
    CHAT,
    EMBEDDINGS,
    RESPONSES,
    normal_usage,
    result_from_body,
    upstream_path,
)
from hybrid_router.router.core.lane_facts import aobserve_latency, aremember_flex_refused
from hybrid_router.router.core.ledger import add_to_ledger, ledger_increments
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.lua import END_STREAM_RUN_SCRIPT
from hybrid_router.router.core.metrics import queue_timing
from hybrid_router.router.core.pricing import estimate_prompt_tokens, served_tier
from hybrid_router.router.core.records import RequestRecord, now
from hybrid_router.router.core.redis_text import text_or_none
from hybrid_router.router.core.states import Status
from hybrid_router.router.core.store import RunEnd, TransitionOutcome
from hybrid_router.router.core.tool_calls import ToolCalls
from hybrid_router.workers.retry import is_retryable, retry_after_seconds
from hybrid_router.workers.stream.claim import WORKER_LOST, aclaim
from hybrid_router.workers.stream.context import StreamContext
from hybrid_router.workers.stream.flex_pressure import (
    flex_verdict,
    is_flex_refusal,
    is_resource_unavailable,
    lane_changed,
    move_to_batch_call,
)
from hybrid_router.workers.stream.publisher import PublishError, StreamHandle
from hybrid_router.workers.stream.runtime import StreamRuntime
from hybrid_router.workers.upstream.base import upstream_answer
from hybrid_router.workers.upstream.sse import TIMEOUT_ERRORS, TRANSPORT_ERRORS, UpstreamStreamError

log = get_logger(__name__)
T = TypeVar("T")

RunOutcome = Literal[
    "completed", "failed", "cancelled", "duplicate", "terminal", "missing", "taken_over",
    "unfinished", "moved",
]
"""How one run of a stream ended: ``completed``, ``failed`` or ``cancelled`` (the request's
terminal state, written by this run); ``duplicate``, ``terminal``, ``missing`` (the claim found
nothing to do); ``taken_over`` (another worker resumed the request: this run wrote nothing);
``unfinished`` (Redis stayed out of reach: the request is left to the sweep, which resumes it);
``moved`` (a flex request moved to the batch lane: it is queued there, not terminal)."""
# Replies that mean Redis is out of reach for now (restarting, loading, connection cut): a
# store write is retried on these for `Settings.stream_redis_grace_s`.
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError,
                                               redis.BusyLoadingError, OSError)
FIRST_PAUSE_S = 0.05
MAX_PAUSE_S = 1.0
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


class _StoreUnreachable(Exception):
    """Redis stayed out of reach for longer than `Settings.stream_redis_grace_s`."""


@dataclass
class UsageTally:
    """Tokens paid for across every upstream attempt of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    def add_lost_runs(self, runs: int, messages: list[dict[str, Any]], tokens_relayed: int) -> None:
        """Estimate what `runs` earlier runs, lost with their worker, were paid for: each sent
        the prompt, and together they produced the `tokens_relayed` tokens in the replay log."""
        if runs and tokens_relayed:
            self.prompt_tokens += runs * estimate_prompt_tokens(messages)
            self.completion_tokens += tokens_relayed
            self.estimated = True

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
    relayed: int = 0  # tokens received so far, across runs and attempts
    pieces: list[str] = field(default_factory=list)
    tool_calls: ToolCalls = field(default_factory=ToolCalls)
    finish_reason: str | None = None
    first_token_at: float | None = None
    usage: UsageTally = field(default_factory=UsageTally)
    # Responses and embeddings: the upstream's answer in the endpoint's shape (the final
    # Response object, the embeddings list), and how many Responses events were relayed.
    response: dict[str, Any] | None = None
    response_events: int = 0
    released: bool = False  # the lease went back with the ledger write
    # Names this run in its ledger write's marker (`Keys.accounted`): its cost counts once.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    served_tier: str | None = None  # what the upstream's chunks say served the call
    tier_moved: bool = False  # a flex request moved to the standard tier (once)
    flex_retries: int = 0
    upstream_retries: int = 0  # of this run, against the retry budget (`RetryPolicy`)

    @property
    def lane(self) -> str:
        return self.record.route

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


async def stream_request(request_id: str, rt: StreamRuntime,
                         taken: tuple[str, bytes] | None = None) -> RunOutcome:
    """Stream `request_id` if this delivery wins the claim (or resume it if its worker was lost);
    always leaves it terminal, or, when Redis stays out of reach, to the sweep. `taken`: the
    engine's (taken list, message) this delivery came from."""
    claimed, record = await _ride_out(rt, lambda: aclaim(request_id, rt.ctx, rt.store, taken))
    if claimed == "duplicate" or claimed == "terminal" or claimed == "missing":
        return claimed
    state: StreamState | None = None
    try:
        if record is None:
            return "missing"
        relayed = record.content_tokens_relayed if claimed == "worker_lost" else 0
        state = StreamState(record, rt.publisher.open(request_id, rt.ctx.leases.owner, relayed),
                            relayed=relayed)
        try:
            if claimed == "worker_lost":
                why_not = await _take_over(state, rt)
                if why_not is not None:
                    return await _end_failed(state, rt, Failure(WORKER_LOST, why_not, True))
            return await _stream(state, rt)
        except _StoreUnreachable:
            raise
        except Exception as exc:  # never leave a claimed request streaming
            log.exception("stream crashed", request_id=request_id)
            return await _end_failed(state, rt, Failure("internal_error",
                                                        f"stream worker error: {exc}", True))
    except _StoreUnreachable:
        log.error("Redis unreachable; the stream is left to the sweep", request_id=request_id)
        return "unfinished"
    finally:
        if state is not None:
            rt.publisher.close(state.handle)
        if state is None or not state.released:
            await _end_run(request_id, rt, state.run_id if state is not None else "-")


async def _take_over(state: StreamState, rt: StreamRuntime) -> str | None:
    """Rebuild the state of a stream whose worker was lost from its replay log; None when it
    can be resumed, else why not (the request then fails with what it has)."""
    record = state.record
    events = await _ride_out(rt, lambda: rt.store.events_after(record.id, 0))
    content = "".join(str(e.get("content", "")) for e in events if e.get("type") == "token")
    if content:
        state.pieces.append(content)
    calls_relayed = any(e.get("type") in ("tool_calls", "response") for e in events)
    lost_runs = max(1, record.attempts - 1)
    state.usage.add_lost_runs(lost_runs, list(record.body.get("messages") or []), state.relayed)
    log.warning("stream worker lost; taking the stream over", request_id=record.id,
                relayed_tokens=state.relayed, chars=len(content), resumes=lost_runs)
    lost = (f"the stream worker handling this request stopped (crashed, was killed or lost "
            f"Redis) after relaying {len(content)} characters")
    if lost_runs > rt.settings.stream_max_retries:
        return (f"{lost}, and its retry budget is spent ({lost_runs} workers lost, "
                f"ROUTER_STREAM_MAX_RETRIES={rt.settings.stream_max_retries}); the partial "
                "content is kept in result.content")
    if calls_relayed:
        return (f"{lost}, and it had relayed tool calls or Responses events, which a prefill "
                "cannot continue; the partial content is kept in result.content")
    if content and not rt.settings.stream_resume:
        return (f"{lost}, and the upstream cannot continue a message (ROUTER_STREAM_RESUME is "
                "off); the partial content is kept in result.content")
    return None


async def _ride_out(rt: StreamRuntime, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again while Redis is out of reach (each store write here is safe to
    repeat), for up to `Settings.stream_redis_grace_s`; then `_StoreUnreachable`."""
    deadline = time.monotonic() + rt.settings.stream_redis_grace_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            return await call()
        except REDIS_DOWN as exc:
            if time.monotonic() + pause > deadline:
                raise _StoreUnreachable(str(exc)) from exc
            log.warning("Redis unreachable; trying again", error=str(exc), retry_in_s=pause)
            await asyncio.sleep(pause)
            pause = min(MAX_PAUSE_S, pause * 2)


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
    """End a run that wrote no end of its own (it crashed, lost its claim, or could not reach
    Redis): one script, one round trip, safe to repeat. A request that is not terminal keeps
    its running-index entry, for the sweep to resume."""
    rt.ctx.leases.forget(request_id)
    end = _run_end(request_id, rt, run_id)
    keys = [rt.keys.record(request_id), *end.keys]
    try:
        await _ride_out(rt, lambda: rt.store.scripts.run(END_STREAM_RUN_SCRIPT, keys, end.args))
    except _StoreUnreachable:
        log.error("Redis unreachable; the run's lease expires on its own", request_id=request_id)


def _upstream_request(state: StreamState) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The body of the next attempt: the original, plus the text so far as a prefill (chat);
    and the messages that a usage estimate counts. Responses streams are never resumed (their
    events cannot be continued), so their body is the original."""
    body = dict(state.record.body)
    if state.tier_moved:
        body.pop("service_tier", None)
    if state.record.endpoint == RESPONSES:
        body["stream"] = True
        value = body.get("input")
        return body, value if isinstance(value, list) else [{"content": value}]
    messages: list[dict[str, Any]] = list(body.pop("messages"))
    if state.pieces:
        messages.append({"role": "assistant", "content": state.content})
        for cap in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(cap), int):
                body[cap] = max(1, body[cap] - state.relayed)
    body.update(messages=messages, stream=True, stream_options={"include_usage": True})
    return body, messages


def _read_chat_chunk(state: StreamState, rt: StreamRuntime, chunk: dict[str, Any]) -> int:
    """Relay one chat-completion chunk's text and tool-call deltas; returns the parts relayed."""
    received = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text = delta.get("content") if delta else None
        if text:
            state.pieces.append(text)
            _relay(state, rt, text)
            received += 1
        calls = delta.get("tool_calls") if delta else None
        if calls and isinstance(calls, list):
            state.tool_calls.add(calls)
            _relay(state, rt, calls)
            received += 1
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
    return received


RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponseFailed(Exception):
    """The upstream ended a Responses stream with ``response.failed`` (relayed as is)."""


async def _read_response_event(state: StreamState, rt: StreamRuntime, event: dict[str, Any]
                               ) -> int:
    """Relay one upstream Responses event unchanged (an ``error`` event raises instead, so the
    request ends with the router's ``error`` event); keep its text and the final Response."""
    kind = event.get("type")
    if kind == "error":
        raise UpstreamStreamError(str(event.get("message") or "error inside the stream"),
                                  cast(Any, None), body=event)
    if not isinstance(kind, str):
        return 0
    _relay(state, rt, event)
    state.response_events += 1
    if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
        state.pieces.append(event["delta"])
    response = event.get("response")
    if kind == "response.created" and isinstance(response, dict) and response.get("id"):
        await _remember_response(state, rt, str(response["id"]))
    if kind in RESPONSE_ENDS and isinstance(response, dict):
        state.response = response
        state.finish_reason = str(response.get("status") or kind.rpartition(".")[2])
        if kind == "response.failed":
            error = response.get("error") if isinstance(response.get("error"), dict) else {}
            raise ResponseFailed(str((error or {}).get("message") or "the response failed"))
    return 1


async def _remember_response(state: StreamState, rt: StreamRuntime, response_id: str) -> None:
    """Map the upstream's Response id to the request, for ``GET /v1/responses/{id}``."""
    key = rt.keys.response(response_id[:200])
    ttl = rt.settings.result_ttl_s
    await _ride_out(rt, lambda: rt.redis.set(key, state.record.id, ex=ttl))


async def _embed(state: StreamState, rt: StreamRuntime) -> RunOutcome:
    """An embeddings request on the stream lane: one plain call (retried like a stream's
    first attempt), answered at once; nothing is relayed before the ``done`` event."""
    settings, policy = rt.settings, rt.ctx.policy
    timeout = httpx.Timeout(settings.upstream_timeout_s)
    retries = 0
    while True:
        try:
            answer = await rt.upstream.call(dict(state.record.body), timeout,
                                            upstream_path(EMBEDDINGS))
        except Exception as exc:
            failure = _classify(exc, False)
            if failure.retryable and policy.allows(retries + 1):
                retries += 1
                delay = policy.backoff(retries, retry_after_seconds(exc))
                log.warning("upstream call failed; retrying", request_id=state.record.id,
                            retry=retries, delay_s=round(delay, 3), error=failure.message)
                await asyncio.sleep(delay)
                if await _is_terminal(state.record.id, rt):
                    return await _end_stopped(state, rt)
                continue
            return await _end_failed(state, rt, failure)
        _result, usage = result_from_body(answer)
        state.usage.add(usage, [], 0)
        state.response, state.finish_reason = answer, "stop"
        state.first_token_at = now()
        return await _end_completed(state, rt)


@dataclass
class _Attempt:
    """One upstream call of a stream: what it sends, and what came back so far."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]
    received: int = 0
    usage: dict[str, Any] | None = None


async def _stream(state: StreamState, rt: StreamRuntime) -> RunOutcome:
    """Call the upstream until the stream ends: each attempt resumes after what was relayed;
    a failure is retried (backoff, retry budget) or ends the request with its reason."""
    if state.record.endpoint == EMBEDDINGS:
        return await _embed(state, rt)
    deadline = time.monotonic() + rt.settings.stream_total_timeout_s
    first_attempt = True  # the claim has just seen the request dispatched, not terminal
    while True:
        if not first_attempt and await _is_terminal(state.record.id, rt):
            return await _end_stopped(state, rt)
        first_attempt = False
        attempt = _Attempt(*_upstream_request(state))
        state.finish_reason = None
        try:
            await _run_attempt(state, rt, attempt, deadline)
        except Exception as exc:
            outcome = await _attempt_failed(state, rt, attempt, exc)
            if outcome == "retry":
                continue
            return outcome
        state.usage.add(attempt.usage, attempt.messages, attempt.received)
        return await _end_completed(state, rt)


async def _run_attempt(state: StreamState, rt: StreamRuntime, attempt: _Attempt,
                       deadline: float) -> None:
    """Relay one upstream stream to its end (or raise: stopped, total timeout, a failure)."""
    settings = rt.settings
    endpoint = state.record.endpoint
    timeout = httpx.Timeout(settings.upstream_timeout_s, read=settings.stream_idle_timeout_s)
    async with rt.upstream.stream(attempt.body, timeout, upstream_path(endpoint)) as chunks:
        async for chunk in chunks:
            if endpoint == RESPONSES:
                attempt.received += await _read_response_event(state, rt, chunk)
                answer = state.response
                if answer is not None:
                    attempt.usage = normal_usage(answer.get("usage"))
                    state.served_tier = answer.get("service_tier") or state.served_tier
            else:
                attempt.usage = chunk.get("usage") or attempt.usage
                state.served_tier = chunk.get("service_tier") or state.served_tier
                attempt.received += _read_chat_chunk(state, rt, chunk)
            if state.handle.stopped:
                raise _Stopped
            if time.monotonic() > deadline:
                raise _TotalTimeout
    if state.finish_reason is None:
        raise StreamDropped("the upstream stream ended without a finish reason")


async def _attempt_failed(state: StreamState, rt: StreamRuntime, attempt: _Attempt,
                          exc: Exception) -> RunOutcome | Literal["retry"]:
    """How a failed attempt ends the run: stopped, failed with its reason, moved to another
    lane, or "retry" (after the backoff)."""
    usage = attempt.usage
    if isinstance(exc, ResponseFailed):  # raised by the final event: its usage is the bill
        usage = normal_usage((state.response or {}).get("usage")) or usage
    state.usage.add(usage, attempt.messages, attempt.received)
    if isinstance(exc, _Stopped):
        return await _end_stopped(state, rt)
    if isinstance(exc, _TotalTimeout):
        return await _end_failed(state, rt, Failure(
            "timeout", f"the stream ran longer than {rt.settings.stream_total_timeout_s:g}s "
            "(ROUTER_STREAM_TOTAL_TIMEOUT_S); the partial content is kept", False))
    if isinstance(exc, PublishError):
        return await _end_failed(state, rt, Failure("publish_failed", str(exc), True))
    if isinstance(exc, ResponseFailed):
        return await _end_failed(state, rt, Failure(
            "upstream_response_failed", f"the upstream's response failed: {exc}", False))
    if state.lane == "flex" and not state.tier_moved:
        action = await _flex_pressure(state, rt, exc)
        if action == "moved":
            return "moved"
        if action == "taken_over":
            return await _end_stopped(state, rt)
        if action is not None:
            return "retry"
    failure = await _retry_or_failure(state, rt, exc)
    return "retry" if failure is None else await _end_failed(state, rt, failure)


async def _retry_or_failure(state: StreamState, rt: StreamRuntime,
                            exc: Exception) -> Failure | None:
    """None after the backoff when the failure may be retried, else the failure to end with."""
    relayed = bool(state.pieces or state.tool_calls or state.response_events)
    failure = _classify(exc, relayed)
    if (state.tool_calls or state.response_events) and failure.retryable:
        what = "tool calls were" if state.tool_calls else "Responses events were"
        return Failure(failure.code, f"{failure.message} ({what} relayed, so the stream "
                       "cannot be resumed; submit it again)", True)
    if failure.code == "stream_interrupted" and not rt.settings.stream_resume:
        return Failure(failure.code, f"{failure.message}; the upstream cannot continue "
                       "a message (ROUTER_STREAM_RESUME is off)", True)
    if not failure.retryable:
        return failure
    if not rt.ctx.policy.allows(state.upstream_retries + 1):
        return Failure(failure.code, f"{failure.message} (gave up after "
                       f"{state.upstream_retries} retries)", True)
    state.upstream_retries += 1
    delay = rt.ctx.policy.backoff(state.upstream_retries, retry_after_seconds(exc))
    log.warning("upstream attempt failed; retrying", request_id=state.record.id,
                retry=state.upstream_retries, delay_s=round(delay, 3), error=failure.message,
                resume_from_chars=len(state.content))
    await asyncio.sleep(delay)
    return None


async def _flex_pressure(state: StreamState, rt: StreamRuntime,
                         exc: BaseException) -> str | None:
    """A flex call failed with `exc`: "retry" (after the backoff), "standard" (the request now
    goes at the standard tier), "moved" (it is queued on the batch lane), "taken_over" (another
    worker holds it now), or None (not a flex matter: the usual retry policy applies). See
    `hybrid_router.workers.stream.flex_pressure`."""
    record = state.record
    if is_flex_refusal(exc):
        await _ride_out(rt, lambda: aremember_flex_refused(rt.redis, rt.settings, record.model))
        log.warning("the upstream does not serve this model at the flex tier; sending it at the "
                    "standard tier, and choosing standard for this model for "
                    f"{rt.settings.flex_unsupported_ttl_s}s (ROUTER_FLEX_UNSUPPORTED_TTL_S)",
                    request_id=record.id, model=record.model, upstream=str(exc)[:200])
        await _to_standard(state, rt, "the upstream refused flex for this model (400)")
        return "standard"
    if not is_resource_unavailable(exc):
        return None
    backoff = rt.ctx.policy.backoff(state.flex_retries + 1, retry_after_seconds(exc))
    verdict = flex_verdict(record, rt.settings, retries_so_far=state.flex_retries,
                           backoff_s=backoff, relayed_anything=bool(state.relayed),
                           may_batch=record.may_batch is not False)
    if verdict.action == "retry":
        state.flex_retries += 1
        log.warning("flex resource unavailable; retrying", request_id=record.id,
                    retry=state.flex_retries, delay_s=round(verdict.delay_s, 3))
        await asyncio.sleep(verdict.delay_s)
        return "retry"
    if verdict.action == "batch":
        script, keys, args = move_to_batch_call(record, rt.settings, rt.ctx.leases.owner,
                                                verdict.reason)
        moved = await _ride_out(rt, lambda: rt.store.scripts.run(script, keys, args))
        if int(moved) == 1:
            rt.ctx.leases.forget(record.id)
            state.released = True
            log.warning("flex request moved to the batch lane", request_id=record.id,
                        reason=verdict.reason)
            return "moved"
        holder = await _ride_out(rt, lambda: rt.redis.get(rt.keys.lease(record.id)))
        if holder is not None and text_or_none(holder) != rt.ctx.leases.owner:
            state.handle.lost = True  # another worker took the stream over: it goes on
            return "taken_over"
    await _to_standard(state, rt, verdict.reason)
    return "standard"


async def _to_standard(state: StreamState, rt: StreamRuntime, reason: str) -> None:
    """Move a flex request to the standard tier, once: the record says so and a
    ``lane_changed`` event announces it (after every token so far, in order)."""
    state.tier_moved = True
    record = state.record
    note = f"{record.route_reason}; then {reason}, so it moved to the standard tier"
    state.record = record.model_copy(update={"route": "stream", "route_reason": note,
                                             "service_tier": "default"})
    with contextlib.suppress(PublishError):
        await _flush(state, rt)
    await _ride_out(rt, lambda: rt.store.annotate(record.id, {
        "route": "stream", "route_reason": note, "service_tier": "default"}))
    await _ride_out(rt, lambda: rt.store.emit(
        record.id, [lane_changed("flex", "stream", "default", reason)]))
    log.info("flex request moved to the standard tier", request_id=record.id, reason=reason)


def _relay(state: StreamState, rt: StreamRuntime, part: ev.Produced) -> None:
    """Hand one part (a token's text, or one chunk's tool-call deltas) to the publisher."""
    if state.first_token_at is None:
        state.first_token_at = now()
    state.relayed += 1
    rt.publisher.publish(state.handle, part)


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
    status: Any = await _ride_out(rt, lambda: rt.redis.hget(rt.keys.record(request_id), "status"))
    return status is None or status in (b"completed", b"failed", b"cancelled")


async def _flush(state: StreamState, rt: StreamRuntime) -> None:
    """Wait until every token is in the replay log (the publisher rides out an outage of up
    to the grace period)."""
    await rt.publisher.flush(state.handle, rt.settings.stream_redis_grace_s + 5)


async def _write_end(rt: StreamRuntime, state: StreamState, to_status: str,
                     **kw: Any) -> TransitionOutcome:
    """The run's last record write (a guarded transition, safe to repeat): a repeat after a
    lost reply that finds the request already in `to_status` counts as this run's move."""
    outcome = await _ride_out(rt, lambda: rt.store.transition(
        state.record.id, to_status, allowed_from=["streaming"], **kw))
    if not outcome.moved and outcome.previous == to_status and to_status != "cancelled":
        return TransitionOutcome(True, "streaming")
    if outcome.previous == "lease_lost":
        state.handle.lost = True
    return outcome


def _cost_fields(state: StreamState, rt: StreamRuntime) -> tuple[Decimal, dict[str, int],
                                                                dict[str, Any]]:
    usage = state.usage.as_dict()
    tier = served_tier(state.served_tier, state.record.service_tier)
    cost, increments = ledger_increments(rt.settings, state.lane, state.record.model, usage,
                                         tier=tier)
    fields: dict[str, Any] = {
        "usage": usage,
        "served_tier": tier,
        "cost_usd": str(cost),
        "first_token_at": state.first_token_at,
        "content_tokens_relayed": state.relayed,
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
    if state.record.endpoint != CHAT:
        fields["result"] = {**fields["result"], "message": None, "response": state.response}
    fields["finished_at"] = finished_at = now()
    outcome = await _write_end(
        rt, state, "completed", fields=fields,
        event=ev.done(state.finish_reason, fields["usage"], cost, len(content),
                      fields["served_tier"]),
        run_end=_ending(rt, state, increments,
                        _finished_record(state, "completed", finished_at)),
    )
    if not outcome.moved:  # cancelled (or swept) between the last token and now
        return await _end_stopped(state, rt)
    _ended(rt, state)
    await _notify(state, rt)
    if not state.tier_moved and state.flex_retries == 0:
        with contextlib.suppress(*REDIS_DOWN):
            await aobserve_latency(rt.redis, rt.settings, state.lane, state.record.model,
                                   finished_at - state.record.created_at)
    log.info("stream completed", request_id=state.record.id, chars=len(content),
             events=state.handle.events_published, cost_usd=str(cost))
    return "completed"


async def _end_failed(state: StreamState, rt: StreamRuntime, failure: Failure) -> RunOutcome:
    with contextlib.suppress(PublishError):
        await _flush(state, rt)
    _cost, increments, fields = _cost_fields(state, rt)
    fields["error"] = {"code": failure.code, "message": failure.message,
                       "retryable": failure.retryable}
    if state.pieces or state.response is not None:
        fields["result"] = {"content": state.content, "finish_reason": None}
        if state.response is not None:  # a Responses stream the upstream ended as failed
            fields["result"]["response"] = state.response
    fields["finished_at"] = finished_at = now()
    outcome = await _write_end(
        rt, state, "failed", fields=fields,
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
    """The request became terminal under us (cancelled): record what was paid for. Or another
    worker took the stream over: write nothing (it accounts for what the replay log holds)."""
    if state.handle.lost:
        log.warning("stream taken over by another worker", request_id=state.record.id)
        return "taken_over"
    _cost, increments, fields = _cost_fields(state, rt)
    if state.usage.paid:
        ending = _ending(rt, state, increments)
        await _ride_out(rt, lambda: rt.store.annotate(state.record.id, fields, ending))
        _ended(rt, state)
    log.info("stream stopped: request is terminal", request_id=state.record.id,
             tokens_paid=state.usage.completion_tokens)
    return "cancelled"
