"""``GET /v1/requests/{id}/events``: a request's events as Server-Sent Events, resumable.

Wire format (docs/STREAMING.md, /work/notes/CONTRACTS.md): ``id: <seq>``, ``event: <type>``,
``data: <event JSON>`` per event; ``: keep-alive`` comments every ``Settings.sse_keepalive_s``;
resumes after ``Last-Event-ID`` (or ``?after=<seq>``); closes after ``done``, ``error`` or
``cancelled``. Events are replayed from the request's log, then taken live from one pub/sub
connection shared by the process (`router.event_hub`), so a client that joins late or
reconnects gets every event, and a slow client only delays its own reads: the producer writes
to Redis and never waits for any subscriber.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response

from router.api.deps import CallerDep, EventsDep, SettingsDep, StoreDep
from router.api.fast_path import known_caller, with_fast_path
from router.api.routes.requests import check_owned
from router.events import MAX_SEQ
from router.intake import IntakeError
from router.schemas import ErrorResponse
from router.sse import KEEPALIVE, SSEResponse, format_event

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
            raise IntakeError(400, f"Last-Event-ID must be an event seq (an integer from 0 to "
                              f"{MAX_SEQ}), got {last_event_id[:40]!r}", param="Last-Event-ID")
        return int(text)
    return after or 0


async def request_events(
    request_id: str,
    caller: CallerDep,
    store: StoreDep,
    events: EventsDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ,
                                       description="Resume after this seq.")] = None,
) -> SSEResponse:
    """Stream the request's events (replay + live) until its final event."""
    await check_owned(store, request_id, caller.tenant)
    start = resume_point(last_event_id, after)

    async def body() -> AsyncIterator[bytes]:
        async for event in events.follow(request_id, start, settings.sse_keepalive_s):
            yield KEEPALIVE if event is None else format_event(event)

    return SSEResponse(body(), headers={"X-Request-Id": request_id})


async def request_events_fast(request: Request) -> Response | None:
    """`request_events` without FastAPI's per-request parameter solving (an eighth of the API's
    CPU at 50 streams, benchmark 1), for a plain follow with a known key; None hands anything
    else (``?after=``, a missing or wrong key) to the general path (see router.api.fast_path)."""
    caller = None if request.query_params else await known_caller(request)
    if caller is None:
        return None
    state = request.app.state
    return await request_events(request.path_params["request_id"], caller, state.store,
                                state.events, state.settings,
                                request.headers.get("last-event-id"))


router.add_api_route(
    "/{request_id}/events", request_events, methods=["GET"],
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                "description": "Server-Sent Events, one per request event."}},
    response_class=SSEResponse,
    status_code=200,  # SSEResponse has no default status: without this /openapi.json is a 500
    route_class_override=with_fast_path(request_events_fast),
)
