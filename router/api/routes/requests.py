"""``/v1/requests``: submit, read and cancel requests."""

from __future__ import annotations

import re

import orjson
from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from hybrid_router.router.api.deps import CallerDep, StoreDep
from hybrid_router.router.api.fast_path import FastPathRoute
from hybrid_router.router.api.notify import cancel_and_notify
from hybrid_router.router.api.ratelimit import enforce_rate_limit
from hybrid_router.router.core.errors import Conflict, ErrorCode, NotFound
from hybrid_router.router.core.intake import accept_async, prepare
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lanes import deadline_depends_on_flush
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.router.core.runtime_config import get_flush_interval_async
from hybrid_router.router.core.schemas import CancelResponse, ErrorResponse, RequestView, SubmitRequest, SubmitResponse
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.router.core.stream_url import stream_url
from hybrid_router.settings import Settings

router = APIRouter(prefix="/v1/requests", tags=["requests"])

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 429, 503)
}


def urls_for(request: Request, request_id: str) -> tuple[str, str]:
    """The request's events and result URLs: under `Settings.public_base_url` when set, else
    relative to the app's root. Never built from the client's Host header: a
    forged Host would put the attacker's address into URLs that clients follow."""
    base = base_for(request)
    return f"{base}/v1/requests/{request_id}/events", f"{base}/v1/requests/{request_id}"


def base_for(request: Request) -> str:
    """`Settings.public_base_url`, else the app's root path (relative URLs)."""
    settings: Settings = request.app.state.settings
    base: str = settings.public_base_url or request.scope.get("root_path", "")
    return base


def _not_found(request_id: str) -> NotFound:
    return NotFound(f"no request {request_id!r}", param="id", code=ErrorCode.NOT_FOUND)


# Never given out (a uuid4's 13th hex digit is 4): a malformed id is looked up as this one, so
# it never reaches a key, yet costs the same Redis command as an unknown or a foreign id.
NO_SUCH_ID = "0" * 32


def _lookup_id(request_id: str) -> str:
    """The id to read: itself when well-formed, else `NO_SUCH_ID`."""
    return request_id if REQUEST_ID.match(request_id) else NO_SUCH_ID


async def load_owned(store: AsyncRequestStore, request_id: str, tenant: str) -> RequestRecord:
    """The caller's own request, or 404. A malformed id, an unknown one and another tenant's
    get the same 404 after the same single script (`GET_OWNED`: owner first, the record only
    for its owner), so neither the answer nor its timing tells them apart."""
    record = await store.get_owned(_lookup_id(request_id), tenant)
    if record is None:
        raise _not_found(request_id[:64])
    return record


async def check_owned(store: AsyncRequestStore, request_id: str, tenant: str) -> None:
    """`load_owned` for a route that needs only to know the request is the caller's: the same
    404s after the same single read (`HGET` of the owner), whatever the id."""
    if await store.tenant_of(_lookup_id(request_id)) != tenant:
        raise _not_found(request_id[:64])


def view_of(request: Request, record: RequestRecord, keys: Keys) -> RequestView:
    events_url, _ = urls_for(request, record.id)
    data = record.model_dump()
    tenant = data.pop("tenant")
    signed = stream_url(request.app.state.settings, base_for(request), record.id, tenant)
    return RequestView(**data, channel=keys.channel(record.id), events_url=events_url,
                       stream_url=signed)


async def submit(body: SubmitRequest, request: Request, caller: CallerDep) -> Response:
    """Accept a chat completion; high/normal stream at once, low waits for the next batch."""
    # The intake's hot path (bench_intake): app state is read directly rather than through four more
    # dependencies, and the answer is rendered to JSON bytes here: returning a `Response` skips
    # FastAPI's re-validation and encoding of a returned model, while `response_model` still
    # documents the body.
    state = request.app.state
    settings: Settings = state.settings
    store: AsyncRequestStore = state.store
    flush_interval_s = None
    if deadline_depends_on_flush(body.priority, body.deadline_s, settings):
        flush_interval_s = await get_flush_interval_async(state.redis, settings)
    facts = await state.lane_facts.get(state.redis)
    prepared = prepare(body, caller.tenant, settings, flush_interval_s, facts=facts)
    accepted = await accept_async(prepared, store, state.dispatcher, run_in_threadpool)
    record = accepted.record
    events_url, result_url = urls_for(request, record.id)
    content = orjson.dumps({  # the fields and order of `SubmitResponse`
        "id": record.id,
        "status": record.status,
        "route": record.route,
        "route_reason": record.route_reason,
        "service_tier": record.service_tier,
        "expected_latency_s": record.expected_latency_s,
        "priority": record.priority,
        "model": record.model,
        "channel": store.keys.channel(record.id),
        "events_url": events_url,
        "result_url": result_url,
        "idempotent_replay": accepted.replay,
        "stream_url": (stream_url(settings, base_for(request), record.id, caller.tenant)
                       if settings.stream_url_secrets else None),
    })
    return Response(content, status_code=200 if accepted.replay else 202,
                    media_type="application/json")


router.add_api_route(
    "", submit, methods=["POST"], status_code=202, response_model=SubmitResponse,
    responses=_ERRORS, dependencies=[Depends(enforce_rate_limit)],
    route_class_override=FastPathRoute,
)


@router.get("/{request_id}", response_model=RequestView, responses=_ERRORS)
async def get_request(
    request_id: str, request: Request, caller: CallerDep, store: StoreDep
) -> RequestView:
    """The request's record; `result` (or `error`) is filled once it is terminal."""
    record = await load_owned(store, request_id, caller.tenant)
    return view_of(request, record, store.keys)


@router.delete("/{request_id}", response_model=CancelResponse, responses=_ERRORS)
async def cancel_request(
    request_id: str, request: Request, caller: CallerDep, store: StoreDep
) -> CancelResponse:
    """Cancel: a queued request leaves its queue; a streaming one stops its upstream call. A
    request already `submitted` in a batch is cancelled too, but the Batch API cannot cancel
    one line: when its line runs, its usage and cost are recorded on the cancelled record."""
    record = await load_owned(store, request_id, caller.tenant)
    outcome, previous = await cancel_and_notify(request.app.state, record)
    if outcome == "terminal":
        raise Conflict(f"request {request_id} is already {previous}; a finished request cannot be cancelled",
            param="id",
            code=ErrorCode.ALREADY_TERMINAL,
        )
    if outcome == "missing":
        raise NotFound(f"no request {request_id!r}", param="id", code=ErrorCode.NOT_FOUND)
    return CancelResponse(id=request_id, status="cancelled", previous_status=previous)
