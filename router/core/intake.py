"""Accepting a request: validate against settings, classify, store, hand over to a lane.

Shared by the HTTP API (async) and the Python client's direct `enqueue()` (sync). The request is
in Redis (record, queue entry and `accepted` event, in one script) before anyone is told it was
accepted; a stream request is then handed to the Celery stream queue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import orjson

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.callback_policy import callback_refusal
from hybrid_router.router.core.endpoints import EMBEDDINGS, RESPONSES
from hybrid_router.router.core.errors import Conflict, ErrorCode, InvalidRequest, Unavailable
from hybrid_router.router.core.lanes import NO_FACTS, LaneFacts, choose_lane
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.pricing import estimate_body_prompt_tokens, max_tokens_for_budget
from hybrid_router.router.core.records import STREAMED_ROUTES, RequestRecord, now
from hybrid_router.router.core.schemas import ROUTER_FIELDS, SubmitRequest
from hybrid_router.router.core.states import Status
from hybrid_router.router.core.store import AsyncRequestStore, RequestStore, body_fingerprint
from hybrid_router.settings import Settings

log = get_logger(__name__)


class StreamDispatcher(Protocol):
    """Hands an accepted stream request to the stream workers (Celery in production)."""

    def dispatch(self, request_id: str) -> None: ...


@dataclass(frozen=True)
class Prepared:
    record: RequestRecord
    events: list[str]
    fingerprint: str  # of the whole request, for its idempotency key ("" without a key)


@dataclass(frozen=True)
class Accepted:
    record: RequestRecord
    replay: bool  # True when an idempotency key matched an earlier identical request


def new_request_id() -> str:
    """128 random bits (uuid4: 122 of them random), hex: unguessable and safe in keys."""
    return uuid.uuid4().hex


def prepare(
    req: SubmitRequest,
    tenant: str,
    settings: Settings,
    flush_interval_s: float | None = None,
    send_metadata: bool = False,
    facts: LaneFacts = NO_FACTS,
    batch_allowed: bool = True,
) -> Prepared:
    """Everything about accepting `req` that needs no I/O: checks, route, budget, record.

    `send_metadata`: pass ``metadata`` upstream too (the drop-in, where it is OpenAI's own
    chat-completion field); on ``POST /v1/requests`` it is the router's, kept on the record.
    `facts`: what the lanes measured (`hybrid_router.router.core.lane_facts`), for the lane choice;
    `batch_allowed`: False where the answer must come back on the same call (the drop-in)."""
    model = req.model or settings.default_model
    if settings.allowed_models and model not in settings.allowed_models:
        raise InvalidRequest(f"model {model!r} is not allowed here; allowed models: "
            + ", ".join(settings.allowed_models),
            param="model",
            code=ErrorCode.MODEL_NOT_ALLOWED,
        )
    if req.callback_url is not None:
        refusal = callback_refusal(req.callback_url, settings.callback_allowed_hosts)
        if refusal:
            raise InvalidRequest(refusal, param="callback_url", code=ErrorCode.CALLBACK_NOT_ALLOWED)
    created = now()
    decision = choose_lane(req.priority, req.deadline_s, model, settings, facts=facts,
                           now=created, flush_interval_s=flush_interval_s,
                           client_tier=req.service_tier, batch_allowed=batch_allowed)
    if decision.route == "batch" and req.stream:
        raise InvalidRequest(f"stream=true cannot be used with priority {req.priority}: it goes to the batch lane, "
            "which returns one result. Use priority high (or a short deadline_s) to stream, or "
            "drop stream and follow the events channel.",
            param="stream",
        )
    # One JSON-mode dump serves both the idempotency fingerprint (all fields) and the upstream
    # body (router fields dropped): the intake hot path dumps the request once.
    # It is the body as sent: an agent's ``{"role": "assistant", "content": null,
    # "tool_calls": [...]}`` reaches the upstream unchanged.
    dumped = req.dump_as_sent()
    dumped.setdefault("priority", req.priority)
    body = {name: value for name, value in dumped.items() if name not in ROUTER_FIELDS}
    if send_metadata and req.metadata is not None:
        body["metadata"] = dumped["metadata"]
    body["model"] = model
    body.pop("stream", None)
    body.pop("stream_options", None)
    # The tier asked of the upstream is the lane's: flex or priority when the router chose
    # them; on the standard tier a client's own ``auto``/``default`` goes as sent; none to a batch.
    if decision.tier in ("flex", "priority"):
        body["service_tier"] = decision.tier
    elif decision.route == "batch":
        body.pop("service_tier", None)
    try:
        orjson.dumps(body)
    except TypeError as exc:
        raise InvalidRequest(f"request body cannot be encoded: {exc}", param="messages") from exc
    if req.max_cost_usd is not None:
        cap = max_tokens_for_budget(
            settings,
            model,
            decision.route,
            Decimal(req.max_cost_usd),
            estimate_body_prompt_tokens(body),
            decision.tier,
        )
        if cap <= 0:
            raise InvalidRequest(f"max_cost_usd {req.max_cost_usd} does not cover the prompt of this request on "
                f"the {decision.route} lane; raise the budget",
                param="max_cost_usd",
                code=ErrorCode.BUDGET_TOO_SMALL,
            )
        _cap_output(req.endpoint, body, cap)
    status: Status = "queued" if decision.route == "batch" else "dispatched"
    record = RequestRecord(
        id=new_request_id(),
        tenant=tenant,
        priority=req.priority,
        route=decision.route,
        route_reason=decision.reason,
        service_tier=decision.tier,
        expected_latency_s=decision.expected_latency_s,
        may_batch=None if batch_allowed else False,
        status=status,
        model=model,
        endpoint=req.endpoint,
        body=body,
        metadata=req.metadata,
        idempotency_key=req.idempotency_key,
        callback_url=req.callback_url,
        created_at=created,
        deadline_at=created + req.deadline_s if req.deadline_s is not None else None,
    )
    events = [ev.accepted(decision.route, req.priority)]
    if decision.route == "batch":
        events.append(ev.queued())
    # The fingerprint only matters to an idempotency key: skip hashing the body without one.
    fingerprint = body_fingerprint(dumped) if req.idempotency_key is not None else ""
    return Prepared(record, events, fingerprint)


def _cap_output(endpoint: str, body: dict[str, Any], cap: int) -> None:
    """Lower the body's output cap to `cap` tokens (a budget's), in the endpoint's own field
    (embeddings have no output to cap)."""
    if endpoint == EMBEDDINGS:
        return
    fields = ("max_output_tokens",) if endpoint == RESPONSES else (
        "max_tokens", "max_completion_tokens")
    for field in fields:
        if field in body:
            body[field] = min(int(body[field]), cap)
    if not any(field in body for field in fields):
        body[fields[0]] = cap


def _replay_or_conflict(
    prepared: Prepared, existing: RequestRecord | None, fingerprint: str | None
) -> Accepted:
    if existing is None:
        raise Conflict("idempotency key is being used by a request that expired; retry",
                          param="idempotency_key", code=ErrorCode.IDEMPOTENCY_CONFLICT)
    if fingerprint != prepared.fingerprint:
        raise Conflict(f"idempotency_key {prepared.record.idempotency_key!r} was already used with a "
            "different body; use a new key for a new request",
            param="idempotency_key",
            code=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    return Accepted(existing, replay=True)


def _task_message(prepared: Prepared, dispatcher: StreamDispatcher) -> tuple[str, str] | None:
    """The stream task's message, when the dispatcher can build it for the atomic create.

    With it, the record, its `accepted` event and the Celery message are written by one script;
    a dispatcher without `task_message` (tests, other brokers) is called after the create.
    """
    if prepared.record.route not in STREAMED_ROUTES:
        return None
    build = getattr(dispatcher, "task_message", None)
    if build is None:
        return None
    message: tuple[str, str] = build(prepared.record.id)
    return message


def _announce(prepared: Prepared, dispatcher: StreamDispatcher) -> None:
    """Tell the dispatcher its task message was written by the create (Celery's `task-sent`
    event, sent off the hot path), when it wants to know."""
    announce = getattr(dispatcher, "task_sent", None)
    if announce is not None:
        announce(prepared.record.id)


def _dispatch_failure(exc: Exception) -> dict[str, Any]:
    """The `transition` arguments that end a request whose hand-over to its lane failed."""
    return {
        "fields": {"error": {"code": "dispatch_unavailable", "message": str(exc)}},
        "event": ev.error("dispatch_unavailable", "stream queue unavailable", True),
    }


def _accepted(record: RequestRecord) -> Accepted:
    log.info("request accepted", request_id=record.id, route=record.route,
             priority=record.priority, tenant=record.tenant)
    return Accepted(record, replay=False)


def _dispatch_failed(request_id: str, exc: Exception) -> Unavailable:
    log.error("stream dispatch failed", request_id=request_id, error=str(exc))
    return Unavailable("the stream queue is unavailable; the request was not accepted, retry",
                       code=ErrorCode.DISPATCH_UNAVAILABLE)


async def accept_async(
    prepared: Prepared,
    store: AsyncRequestStore,
    dispatcher: StreamDispatcher,
    dispatch_in_thread: Any,
) -> Accepted:
    """Store the prepared request and hand it to its lane (the API's path)."""
    task = _task_message(prepared, dispatcher)
    outcome = await store.create(prepared.record, prepared.events, prepared.fingerprint, task)
    if not outcome.created:
        existing = await store.get(outcome.request_id)
        return _replay_or_conflict(prepared, existing, outcome.body_fingerprint)
    if task is not None:
        _announce(prepared, dispatcher)
    elif prepared.record.route in STREAMED_ROUTES:
        try:
            await dispatch_in_thread(dispatcher.dispatch, prepared.record.id)
        except Exception as exc:
            await store.transition(prepared.record.id, "failed", **_dispatch_failure(exc))
            raise _dispatch_failed(prepared.record.id, exc) from exc
    return _accepted(prepared.record)


def accept_sync(
    prepared: Prepared, store: RequestStore, dispatcher: StreamDispatcher
) -> Accepted:
    """Store the prepared request and hand it to its lane (the direct `enqueue()` path)."""
    task = _task_message(prepared, dispatcher)
    outcome = store.create(prepared.record, prepared.events, prepared.fingerprint, task)
    if not outcome.created:
        existing = store.get(outcome.request_id)
        return _replay_or_conflict(prepared, existing, outcome.body_fingerprint)
    if task is not None:
        _announce(prepared, dispatcher)
    elif prepared.record.route in STREAMED_ROUTES:
        try:
            dispatcher.dispatch(prepared.record.id)
        except Exception as exc:
            store.transition(prepared.record.id, "failed", **_dispatch_failure(exc))
            raise _dispatch_failed(prepared.record.id, exc) from exc
    return _accepted(prepared.record)
