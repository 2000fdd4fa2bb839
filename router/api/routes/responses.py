"""``POST /v1/responses``, ``GET /v1/responses/{id}`` and ``POST /v1/embeddings``: the OpenAI
drop-ins for the Responses API and embeddings, on the same intake and stream lane as chat.

- ``POST /v1/responses`` with ``stream: true`` relays the upstream's Responses events (its
  ``response.created``, ``response.output_text.delta``, tool-call events, ...,
  ``response.completed``) unchanged and in order, as ``event: <type>`` / ``data: <event>``: the
  stream worker puts each in the request's replay log as a ``response`` event, so a late or
  reconnecting follower of ``GET /v1/requests/{id}/events`` misses none. Without ``stream`` it
  returns the final Response object. Response ids are the upstream's.
- ``GET /v1/responses/{id}`` returns a response made through the router (by the upstream's
  ``resp_...`` id, or the router's request id): the Response object once it ended, else its
  state (``queued`` / ``in_progress``). Another tenant's response answers 404.
- ``POST /v1/embeddings`` answers at once (high or normal priority): one plain upstream call,
  whatever the size of the ``input`` list; the answer is the upstream's own.

Priority, ``X-Priority``, ``Idempotency-Key`` and the refusal of ``low`` (batched: use
``POST /v1/requests`` with ``endpoint``) are as on ``/v1/chat/completions``. A client that goes
away before the end cancels the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hybrid_router.router.api.deps import CallerDep, StoreDep
from hybrid_router.router.api.errors import error_response
from hybrid_router.router.api.ratelimit import enforce_rate_limit
from hybrid_router.router.api.routes.chat import (
    DropInDep,
    accept_drop_in,
    answer_drop_in,
    error_body,
    error_status,
)
from hybrid_router.router.api.routes.requests import load_owned
from hybrid_router.router.api.sse import SSEResponse
from hybrid_router.router.core.event_hub import EventFollower
from hybrid_router.router.core.records import RequestRecord, dumps
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.schemas import EmbeddingsRequest, ErrorResponse, ResponsesRequest
from hybrid_router.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai-compatible"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 502, 503, 504)
}
_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def named_event(event: dict[str, Any]) -> bytes:
    """One Responses event on the wire, as OpenAI sends it: ``event: <type>`` and its JSON."""
    return f"event: {event.get('type')}\ndata: {dumps(event)}\n\n".encode()


def _error_event(code: str, message: str, sequence_number: int) -> bytes:
    """The router's own end of a Responses stream that failed or was cancelled: an ``error``
    event (OpenAI's fields) that also carries ``error``, so the openai SDK raises `APIError`."""
    inner = error_body(code, message)["error"]
    return named_event({"type": "error", "code": code, "message": message, "param": None,
                        "sequence_number": sequence_number, "error": inner})


async def _relay(record: RequestRecord, events: EventFollower, settings: Settings,
                 state: dict[str, bool]) -> AsyncIterator[bytes]:
    """The request's ``response`` events as the upstream's Responses stream."""
    next_seq = 0
    ended = False
    async for event in events.follow(record.id, 0, settings.sse_keepalive_s):
        if event is None:
            yield b": keep-alive\n\n"
            continue
        kind = event["type"]
        if kind == "response":
            upstream = event.get("event") or {}
            if isinstance(upstream.get("sequence_number"), int):
                next_seq = upstream["sequence_number"] + 1
            ended = upstream.get("type") in _ENDS
            yield named_event(upstream)
        elif kind == "done":
            break
        elif kind in ("error", "cancelled"):
            if not ended:
                code = event.get("code", "upstream_error") if kind == "error" else "cancelled"
                message = event.get("message", "the request failed") if kind == "error" \
                    else "the request was cancelled"
                yield _error_event(code, message, next_seq)
            break
    state["final"] = True


def _answer(record: RequestRecord) -> JSONResponse:
    """A finished request's answer in its endpoint's shape, or its error in OpenAI's."""
    response = record.result.response if record.result is not None else None
    if response is not None:  # completed, or failed with the upstream's failed Response
        return JSONResponse(response, headers={"X-Request-Id": record.id})
    code = record.error.code if record.error else f"request_{record.status}"
    message = record.error.message if record.error else f"the request was {record.status}"
    return error_response(error_status(code), message, None, code)


async def create_response(body: ResponsesRequest, call: DropInDep
                          ) -> JSONResponse | SSEResponse:
    """OpenAI Responses API (stream or not) on the stream lane."""
    record = await accept_drop_in(body, call)
    return await answer_drop_in(
        call, record, _answer,
        (lambda state: _relay(record, call.events, call.settings, state)) if body.stream
        else None)


def _pending_view(record: RequestRecord, response_id: str) -> dict[str, Any]:
    """A response that has not ended yet, in the Response object's shape."""
    status = "queued" if record.status in ("queued", "submitted", "dispatched") else "in_progress"
    if record.terminal:
        status = "failed" if record.status == "failed" else "cancelled"
    error = None
    if record.error is not None:
        error = {"code": record.error.code, "message": record.error.message}
    return {"id": response_id, "object": "response", "created_at": int(record.created_at),
            "status": status, "model": record.model, "output": [], "error": error,
            "usage": None, "metadata": record.metadata or {}}


async def get_response(response_id: str, caller: CallerDep, store: StoreDep,
                       request: Request) -> JSONResponse:
    """A response made through the router, by its upstream id or the router's request id."""
    request_id = response_id
    if response_id.startswith("resp_") and len(response_id) <= 200:
        found = await request.app.state.redis.get(store.keys.response(response_id))
        request_id = text(found) if found is not None else ""
    record = await load_owned(store, request_id, caller.tenant)
    if record.endpoint != "/v1/responses":
        return error_response(404, f"no response {response_id[:64]!r}", "response_id",
                              "not_found")
    response = record.result.response if record.result is not None else None
    if record.status == "completed" and response is not None:
        return JSONResponse(response, headers={"X-Request-Id": record.id})
    if response is not None:  # failed, with the upstream's final Response
        return JSONResponse(response, headers={"X-Request-Id": record.id})
    return JSONResponse(_pending_view(record, response_id), headers={"X-Request-Id": record.id})


async def create_embeddings(body: EmbeddingsRequest, call: DropInDep
                            ) -> JSONResponse | SSEResponse:
    """OpenAI embeddings, answered at once (one plain upstream call on the stream lane)."""
    record = await accept_drop_in(body, call)
    return await answer_drop_in(call, record, _answer, None)


_LIMITED = [Depends(enforce_rate_limit)]
router.add_api_route("/responses", create_response, methods=["POST"], responses=_ERRORS,
                     response_model=None, dependencies=_LIMITED)
router.add_api_route("/responses/{response_id}", get_response, methods=["GET"],
                     responses=_ERRORS, response_model=None)
router.add_api_route("/embeddings", create_embeddings, methods=["POST"], responses=_ERRORS,
                     response_model=None, dependencies=_LIMITED)
