"""``POST /v1/chat/completions``: an OpenAI-compatible drop-in for high and normal priority.

Point any OpenAI SDK's ``base_url`` at the router and it works unchanged: the request goes
through the same intake as ``POST /v1/requests`` (auth, validation, idempotency, budget), is
streamed by a stream worker, and its events are relayed here in OpenAI's own wire format —
``chat.completion.chunk`` SSE (role chunk, content and tool-call deltas, finish chunk, a usage
chunk when ``stream_options.include_usage``, then ``data: [DONE]``), or one ``chat.completion``
object (with ``message.tool_calls`` when the model called tools) when ``stream`` is false.
Every field the openai SDK sends (tools, tool_choice, response_format, content parts, metadata,
...) reaches the upstream unchanged; only ``stream``/``stream_options`` are the router's own.

The priority comes from the body field ``priority`` or the ``X-Priority`` header (default
normal; ``X-Priority: normal`` goes to the flex lane where the model has a flex price and its
deadline allows, see `hybrid_router.router.core.lanes`). A ``service_tier`` in the body is honoured and the answer
says which tier served it (``service_tier``, as OpenAI's does). Low priority goes to the batch
lane, which cannot answer this call, so it is refused with a 400 that says where to send it.
If the client goes away before the answer ended, the request is cancelled, so the upstream
stops and no more tokens are paid for.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hybrid_router.router.api.deps import Caller, CallerDep, DispatcherDep, EventsDep, SettingsDep, StoreDep
from hybrid_router.router.api.errors import error_response
from hybrid_router.router.api.fast_path import FastPathRoute
from hybrid_router.router.api.notify import cancel_and_notify
from hybrid_router.router.api.ratelimit import enforce_rate_limit
from hybrid_router.router.api.sse import SSEResponse, format_data
from hybrid_router.router.core.endpoints import CHAT, EMBEDDINGS
from hybrid_router.router.core.errors import ErrorCode, InvalidRequest
from hybrid_router.router.core.event_hub import EventFollower
from hybrid_router.router.core.intake import StreamDispatcher, accept_async, prepare
from hybrid_router.router.core.records import STREAMED_ROUTES, Priority, RequestRecord, RequestResult
from hybrid_router.router.core.schemas import IDEMPOTENCY_KEY_PATTERN, ErrorResponse, SubmitRequest
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.settings import Settings

router = APIRouter(prefix="/v1/chat", tags=["openai-compatible"])

WAIT_TICK_S = 1.0
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 409, 413, 429, 502, 503, 504)
}
_PRIORITIES: tuple[str, ...] = get_args(Priority)
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_UPSTREAM_GATEWAY_CODES = {"upstream_timeout": 504, "timeout": 504, "dispatch_unavailable": 503}


def effective_priority(body: SubmitRequest, header: str | None) -> Priority:
    """Body field first, then ``X-Priority``, else normal; low is refused here."""
    if "priority" in body.model_fields_set:
        priority: str = body.priority
        param = "priority"
    elif header is not None and header.strip():
        priority, param = header.strip().lower(), "X-Priority"
        if priority not in _PRIORITIES:
            raise InvalidRequest(f"X-Priority must be one of {', '.join(_PRIORITIES)}; got "
                              f"{header[:40]!r}", param="X-Priority")
    else:
        return "normal"
    if priority == "low":
        raise InvalidRequest(
            f"priority low is not served by {body.endpoint}: low requests wait for a "
            "discounted batch and cannot answer this call. Submit them with POST /v1/requests "
            f"(priority low, endpoint {body.endpoint}) and read the result by id, or use "
            "priority high or normal here.",
            param=param, code=ErrorCode.PRIORITY_NOT_SUPPORTED,
        )
    return priority  # type: ignore[return-value]


def _completion_id(record: RequestRecord) -> str:
    return f"chatcmpl-{record.id}"


def _chunk(record: RequestRecord, delta: dict[str, Any] | None,
           finish_reason: str | None = None, usage: dict[str, Any] | None = None,
           service_tier: str | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    ]
    body: dict[str, Any] = {
        "id": _completion_id(record), "object": "chat.completion.chunk",
        "created": int(record.created_at), "model": record.model,
        "system_fingerprint": None, "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    if service_tier is not None:
        body["service_tier"] = service_tier
    return body


def error_status(code: str) -> int:
    """The HTTP status an OpenAI client should see for a stream-lane error code."""
    if code.startswith("upstream_") and code[9:].isdigit():
        status = int(code[9:])
        return status if 400 <= status < 500 else 502
    if code == "cancelled":
        return 409
    return _UPSTREAM_GATEWAY_CODES.get(code, 502)


def error_body(code: str, message: str) -> dict[str, Any]:
    status = error_status(code)
    kind = "server_error" if status >= 500 else (
        "rate_limit_error" if status == 429 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _usage_of(record: RequestRecord) -> dict[str, Any] | None:
    return record.usage.model_dump() if record.usage is not None else None


async def _relay(record: RequestRecord, events: EventFollower, settings: Any, include_usage: bool,
                 state: dict[str, bool]) -> AsyncIterator[bytes]:
    """The request's events as OpenAI ``chat.completion.chunk`` SSE."""
    yield format_data(_chunk(record, {"role": "assistant", "content": ""}))
    async for event in events.follow(record.id, 0, settings.sse_keepalive_s):
        if event is None:
            yield b": keep-alive\n\n"
            continue
        kind = event["type"]
        if kind == "token":
            yield format_data(_chunk(record, {"content": event["content"]}))
        elif kind == "tool_calls":
            yield format_data(_chunk(record, {"tool_calls": event["tool_calls"]}))
        elif kind == "done":
            state["final"] = True
            tier = event.get("service_tier")
            yield format_data(_chunk(record, {}, event.get("finish_reason") or "stop",
                                     service_tier=tier))
            if include_usage:
                yield format_data(_chunk(record, None, usage=event.get("usage"),
                                         service_tier=tier))
            yield format_data("[DONE]")
            return
        elif kind == "error":
            state["final"] = True
            yield format_data(error_body(event.get("code", "upstream_error"),
                                          event.get("message", "the request failed")))
            return
        elif kind == "cancelled":
            state["final"] = True
            yield format_data(error_body("cancelled", "the request was cancelled"))
            return
    state["final"] = True


async def wait_final(request: Request, store: AsyncRequestStore, events: EventFollower,
                      record: RequestRecord) -> RequestRecord | None:
    """Wait for the request to end; None if the client went away first (it is cancelled)."""
    async for event in events.follow(record.id, 0, WAIT_TICK_S):
        if event is None and await request.is_disconnected():
            await cancel_and_notify(request.app.state, record)
            return None
    return await store.get(record.id)


def _message(result: RequestResult) -> dict[str, Any]:
    """The answer's ``message``: its text, and its tool calls when it made some."""
    tool_calls = (result.message or {}).get("tool_calls")
    if tool_calls:
        return {"role": "assistant", "content": result.content or None, "refusal": None,
                "tool_calls": tool_calls}
    return {"role": "assistant", "content": result.content, "refusal": None}


def _completion(record: RequestRecord) -> JSONResponse:
    if record.status != "completed" or record.result is None:
        code = record.error.code if record.error else record.status
        message = record.error.message if record.error else f"the request was {record.status}"
        status = error_status(code)
        body = error_body(code, message)["error"]
        return error_response(status, body["message"], None, code)
    return JSONResponse({
        "id": _completion_id(record), "object": "chat.completion",
        "created": int(record.created_at), "model": record.model, "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": _message(record.result),
            "logprobs": None,
            "finish_reason": record.result.finish_reason or "stop",
        }],
        "usage": _usage_of(record),
        "service_tier": record.served_tier,
    }, headers={"X-Request-Id": record.id, "X-Router-Lane": record.route})


@dataclass(frozen=True)
class DropIn:
    """What every drop-in call (chat completions, responses, embeddings) is served with."""

    request: Request
    caller: Caller
    settings: Settings
    store: AsyncRequestStore
    events: EventFollower
    dispatcher: StreamDispatcher
    x_priority: str | None = None
    idempotency_key: str | None = None


async def drop_in(
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    events: EventsDep,
    dispatcher: DispatcherDep,
    x_priority: Annotated[str | None, Header(alias="X-Priority")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> DropIn:
    """The `DropIn` of a request (a FastAPI dependency)."""
    return DropIn(request, caller, settings, store, events, dispatcher, x_priority,
                  idempotency_key)


DropInDep = Annotated[DropIn, Depends(drop_in)]


async def accept_drop_in(body: SubmitRequest, call: DropIn) -> RequestRecord:
    """Accept a drop-in call on the stream lane: its priority (body, else ``X-Priority``), its
    ``Idempotency-Key`` header, the intake's checks; a request the classifier sends to the
    batch lane is refused (a drop-in call waits for its answer)."""
    priority = effective_priority(body, call.x_priority)
    updates: dict[str, Any] = {"priority": priority}
    idempotency_key = call.idempotency_key
    if idempotency_key and not body.idempotency_key:
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise InvalidRequest("Idempotency-Key header must be 1 to 200 characters from "
                              "A-Z a-z 0-9 _ . : -", param="Idempotency-Key")
        updates["idempotency_key"] = idempotency_key
    # The validated body is kept as is (never dumped and validated again: that once dropped an
    # assistant turn's `content: null` and blamed the header for the failure).
    submit = body.model_copy(update=updates)
    facts = await call.request.app.state.lane_facts.get(call.request.app.state.redis)
    prepared = prepare(submit.model_copy(update={"stream": False}), call.caller.tenant,
                       call.settings, send_metadata=body.endpoint != EMBEDDINGS, facts=facts,
                       batch_allowed=False)
    if prepared.record.route not in STREAMED_ROUTES:
        raise InvalidRequest(
            f"priority {priority} is routed to the batch lane here ({prepared.record.route_reason}"
            f"), which cannot answer {body.endpoint}; use priority high, or POST /v1/requests",
            param="priority", code=ErrorCode.PRIORITY_NOT_SUPPORTED,
        )
    return (await accept_async(prepared, call.store, call.dispatcher, run_in_threadpool)).record


Relay = Callable[[dict[str, bool]], AsyncIterator[bytes]]


async def answer_drop_in(call: DropIn, record: RequestRecord,
                         answer: Callable[[RequestRecord], JSONResponse],
                         relay: Relay | None) -> JSONResponse | SSEResponse:
    """A drop-in call's answer: with `relay`, its SSE body (``state["final"]`` set once the end
    was sent; a client that leaves before cancels the request); else, once the request ended,
    `answer` of its record (499 if the client left first: the request is cancelled)."""
    request = call.request
    if relay is None:
        final = await wait_final(request, call.store, call.events, record)
        if final is None:
            return error_response(499, "client closed the request", code=ErrorCode.CLIENT_CLOSED)
        return answer(final)
    state = {"final": False}

    async def cancel_if_unfinished() -> None:
        if not state["final"]:
            await cancel_and_notify(request.app.state, record)

    return SSEResponse(relay(state), on_disconnect=cancel_if_unfinished,
                       headers={"X-Request-Id": record.id, "X-Router-Lane": record.route})


async def chat_completions(body: SubmitRequest, call: DropInDep) -> JSONResponse | SSEResponse:
    """OpenAI chat completions (stream or not) on the stream lane."""
    if body.endpoint != CHAT:
        raise InvalidRequest(f"endpoint {body.endpoint} is not served here: send that body "
                             f"to {body.endpoint}, or leave endpoint out", param="endpoint")
    stream = bool(body.stream)
    options = (body.model_extra or {}).get("stream_options")
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    record = await accept_drop_in(body, call)
    return await answer_drop_in(
        call, record, _completion,
        (lambda state: _relay(record, call.events, call.settings, include_usage, state))
        if stream else None)


router.add_api_route(
    "/completions", chat_completions, methods=["POST"], responses=_ERRORS, response_model=None,
    dependencies=[Depends(enforce_rate_limit)],
    route_class_override=FastPathRoute,
)
