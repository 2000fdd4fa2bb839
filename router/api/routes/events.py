"""``GET /v1/requests/{id}/events``: a request's events as Server-Sent Events, resumable.

Wire format (docs/STREAMING.md, /work/notes/CONTRACTS.md): ``id: <seq>``, ``event: <type>``,
``data: <event JSON>`` per event; ``: keep-alive`` comments every ``Settings.sse_keepalive_s``;
resumes after ``Last-Event-ID`` (or ``?after=<seq>``); closes after ``done``, ``error`` or
``cancelled``. Events are replayed from the request's log, then taken live from one pub/sub
connection shared by the process (`hybrid_router.router.core.event_hub`), so a client that joins late or
reconnects gets every event, and a slow client only delays its own reads: the producer writes
to Redis and never waits for any subscriber.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request

from hybrid_router.router.api.deps import EventsDep, SettingsDep, StoreDep, get_caller
from hybrid_router.router.api.fast_path import FastPathRoute
from hybrid_router.router.api.routes.requests import check_owned
from hybrid_router.router.api.sse import KEEPALIVE, SSEResponse, format_event
from hybrid_router.router.core.errors import InvalidRequest
from hybrid_router.router.core.event_hub import EventFollower
from hybrid_router.router.core.events import MAX_SEQ
from hybrid_router.router.core.schemas import ErrorResponse
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.router.core.stream_url import TOKEN_PARAM, StreamTokenError, verify
from hybrid_router.settings import Settings

router = APIRouter(prefix="/v1/requests", tags=["requests"])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404)
}


def resume_point(last_event_id: str | None, after: int | None) -> int:
    """The seq to resume after: ``Last-Event-ID`` wins over ``?after=``; 0 = from the start.

    Checked before the response starts, so a bad cursor is a 400, never a dropped stream."""
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_SEQ)) \
                or int(text) > MAX_SEQ:
            raise InvalidRequest(f"Last-Event-ID must be an event seq (an integer from 0 to "
                              f"{MAX_SEQ}), got {last_event_id[:40]!r}", param="Last-Event-ID")
        return int(text)
    return after or 0


def token_tenant(settings: Settings, request_id: str, token: str) -> str:
    """The tenant a signed stream URL's token grants `request_id`'s events to, or the 401."""
    try:
        return verify(settings, request_id, token).tenant
    except StreamTokenError as exc:
        exc.param = TOKEN_PARAM
        raise


async def request_events(
    request_id: str,
    request: Request,
    store: StoreDep,
    events: EventsDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ,
                                       description="Resume after this seq.")] = None,
    token: Annotated[str | None, Query(
        description="The token of a signed stream URL (`stream_url` of the request): opens "
        "this request's events without an API key.")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> SSEResponse:
    """Stream the request's events (replay + live) until its final event. Authorised by a
    bearer key, or by the token of the request's signed `stream_url`."""
    if token is not None:
        tenant = token_tenant(settings, request_id, token)
    else:
        tenant = (await get_caller(request, authorization)).tenant
    return await serve_events(request_id, tenant, store, events, settings, last_event_id, after)


async def serve_events(request_id: str, tenant: str, store: AsyncRequestStore,
                       events: EventFollower, settings: Settings, last_event_id: str | None,
                       after: int | None = None) -> SSEResponse:
    """The SSE response of `request_id`'s events for `tenant` (404 unless it owns it)."""
    await check_owned(store, request_id, tenant)
    start = resume_point(last_event_id, after)

    async def body() -> AsyncIterator[bytes]:
        async for event in events.follow(request_id, start, settings.sse_keepalive_s):
            yield KEEPALIVE if event is None else format_event(event)

    return SSEResponse(body(), headers={"X-Request-Id": request_id})


router.add_api_route(
    "/{request_id}/events", request_events, methods=["GET"],
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                "description": "Server-Sent Events, one per request event."}},
    response_class=SSEResponse,
    status_code=200,  # SSEResponse has no default status: without this /openapi.json is a 500
    route_class_override=FastPathRoute,
)
