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
normal). Low priority goes to the batch lane, which cannot answer this call, so it is refused
with a 400 that says where to send it. If the client goes away before the answer ended, the
request is cancelled, so the upstream stops and no more tokens are paid for.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hybrid_router.router.api.deps import CallerDep, DispatcherDep, EventsDep, SettingsDep, StoreDep
from hybrid_router.router.api.errors import error_response
from hybrid_router.router.api.fast_path import FastPathRoute
from hybrid_router.router.api.notify import cancel_and_notify
from hybrid_router.router.api.ratelimit import enforce_rate_limit
from hybrid_router.router.api.sse import SSEResponse, format_data
from hybrid_router.router.core.event_hub import EventFollower
from hybrid_router.router.core.intake import IntakeError, accept_async, prepare
from hybrid_router.router.core.records import Priority, RequestRecord, RequestResult
from hybrid_router.router.core.schemas import IDEMPOTENCY_KEY_PATTERN, ErrorResponse, SubmitRequest
from hybrid_router.router.core.store import AsyncRequestStore

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
            raise IntakeError(400, f"X-Priority must be one of {', '.join(_PRIORITIES)}; got "
                              f"{header[:40]!r}", param="X-Priority")
    else:
        return "normal"
    if priority == "low":
        raise IntakeError(
            400,
            "priority low is not served by /v1/chat/completions: low requests wait for a "
            "discounted batch and cannot answer this call. Submit them with POST /v1/requests "
            "(priority low) and read the result by id, or use priority high or normal here.",
            param=param, code="priority_not_supported",
        )
    return priority  # type: ignore[return-value]


def _completion_id(record: RequestRecord) -> str:
    return f"chatcmpl-{record.id}"


def _chunk(record: RequestRecord, delta: dict[str, Any] | None,
           finish_reason: str | None = None, usage: dict[str, Any] | None = None
           ) -> dict[str, Any]:
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
    return body


def error_status(code: str) -> int:
    """The HTTP status an OpenAI client should see for a stream-lane error code."""
    if code.startswith("upstream_") and code[9:].isdigit():
        status = int(code[9:])
        return status if 400 <= status < 500 else 502
    if code == "cancelled":
        return 409
    return _UPSTREAM_GATEWAY_CODES.get(code, 502)


def _error_body(code: str, message: str) -> dict[str, Any]:
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
            yield format_data(_chunk(record, {}, event.get("finish_reason") or "stop"))
            if include_usage:
                yield format_data(_chunk(record, None, usage=event.get("usage")))
            yield format_data("[DONE]")
            return
        elif kind == "error":
            state["final"] = True
            yield format_data(_error_body(event.get("code", "upstream_error"),
                                          event.get("message", "the request failed")))
            return
        elif kind == "cancelled":
            state["final"] = True
            yield format_data(_error_body("cancelled", "the request was cancelled"))
            return
    state["final"] = True


async def _wait_final(request: Request, store: AsyncRequestStore, events: EventFollower,
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
        body = _error_body(code, message)["error"]
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
    }, headers={"X-Request-Id": record.id})


async def chat_completions(
    body: SubmitRequest,
    request: Request,
    caller: CallerDep,
    settings: SettingsDep,
    store: StoreDep,
    events: EventsDep,
    dispatcher: DispatcherDep,
    x_priority: Annotated[str | None, Header(alias="X-Priority")] = None,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse | SSEResponse:
    """OpenAI chat completions (stream or not) on the stream lane."""
    priority = effective_priority(body, x_priority)
    updates: dict[str, Any] = {"priority": priority}
    if idempotency_key and not body.idempotency_key:
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise IntakeError(400, "Idempotency-Key header must be 1 to 200 characters from "
                              "A-Z a-z 0-9 _ . : -", param="Idempotency-Key")
        updates["idempotency_key"] = idempotency_key
    # The validated body is kept as is (never dumped and validated again: that once dropped an
    # assistant turn's `content: null` and blamed the header for the failure).
    submit = body.model_copy(update=updates)
    stream = bool(submit.stream)
    options = (submit.model_extra or {}).get("stream_options")
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    prepared = prepare(submit.model_copy(update={"stream": False}), caller.tenant, settings,
                       send_metadata=True)
    if prepared.record.route != "stream":
        raise IntakeError(
            400,
            f"priority {priority} is routed to the batch lane here ({prepared.record.route_reason}"
            "), which cannot answer /v1/chat/completions; use priority high, or POST /v1/requests",
            param="priority", code="priority_not_supported",
        )
    record = (await accept_async(prepared, store, dispatcher, run_in_threadpool)).record
    if not stream:
        final = await _wait_final(request, store, events, record)
        if final is None:
            return error_response(499, "client closed the request", code="client_closed")
        return _completion(final)
    state = {"final": False}

    async def cancel_if_unfinished() -> None:
        if not state["final"]:
            await cancel_and_notify(request.app.state, record)

    return SSEResponse(_relay(record, events, settings, include_usage, state),
                       on_disconnect=cancel_if_unfinished, headers={"X-Request-Id": record.id})


router.add_api_route(
    "/completions", chat_completions, methods=["POST"], responses=_ERRORS, response_model=None,
    dependencies=[Depends(enforce_rate_limit)],
    route_class_override=FastPathRoute,
)
