"""Hand-written fast paths for the hot routes, offered each request before FastAPI's routing.

Why: FastAPI solves a route's parameters and dependencies generically on every request
(content-type parsing through `email.message`, header extraction, per-dependency cache keys,
nested dependency resolution), and since 0.165 finds the route by walking every included router
(seven matches per request) through three more middlewares: together more than a third of the
CPU of a ``POST /v1/requests`` (benchmark 3, issue 7). A route declares its fast path with
``route_class_override=with_fast_path(fast)``; the `FastPaths` middleware (installed by
`create_app`, inside the body size limit) matches those routes' paths itself and calls `fast`.
The fast path handles only the common, well-formed request and returns None for anything else,
so every unusual request (no or another content type, bad JSON, invalid fields, a wrong key)
goes on through FastAPI to the route's general handler and gets exactly its answer (the body
the fast path read is handed on). An exception a fast path raises is answered by the app's own
exception handlers, as FastAPI would answer it; the route's declared signature still makes the
OpenAPI document and serves as that general path.

A fast path must have no side effect before it decides to return None: the general handler
then runs the whole request again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette._utils import get_route_path
from starlette.applications import Starlette
from starlette.convertors import Convertor
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybrid_router.router.api.deps import Caller, get_caller
from hybrid_router.router.api.ratelimit import enforce_rate_limit
from hybrid_router.router.core.errors import RouterRefusal

M = TypeVar("M", bound=BaseModel)
FastHandler = Callable[[Request], Awaitable[Response | None]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
JSON_CONTENT_TYPE = "application/json"


class FastPathRoute(APIRoute):
    """An `APIRoute` whose requests `FastPaths` first offers to `fast` (set by `with_fast_path`)."""

    fast: FastHandler


def with_fast_path(fast: FastHandler) -> type[APIRoute]:
    """A route class (for ``route_class_override``) whose requests try `fast` first."""
    return type("FastPathRoute", (FastPathRoute,), {"fast": staticmethod(fast)})


@dataclass(frozen=True)
class _Entry:
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]
    fast: FastHandler


class FastPaths:
    """ASGI middleware: a request for a `FastPathRoute` (method and path) goes to its fast path.

    `routes` are those of the routers the app includes at its root (their paths are then the
    app's). They are matched in order, on the same compiled path patterns FastAPI uses; put a
    fast path only on a route whose method and path no earlier route can also match.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.table: dict[str, list[_Entry]] = {}
        for route in routes:
            if isinstance(route, FastPathRoute):
                for method in route.methods or ():
                    self.table.setdefault(method, []).append(
                        _Entry(route.path_regex, route.param_convertors, type(route).fast))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            entries = self.table.get(scope["method"])
            if entries:
                path = get_route_path(scope)
                for entry in entries:
                    match = entry.regex.match(path)
                    if match is not None:
                        await self._offer(entry, match, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _offer(self, entry: _Entry, match: re.Match[str], scope: Scope, receive: Receive,
                     send: Send) -> None:
        scope["path_params"] = {name: entry.convertors[name].convert(value)
                                for name, value in match.groupdict().items()}
        request = Request(scope, receive)
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await entry.fast(request)
            if response is not None:
                await response(scope, receive, sender)
                return
        except Exception as exc:
            handler = _handler_for(scope["app"], exc)
            if handler is None or started:
                raise  # unexpected: ServerErrorMiddleware answers 500, as for any route
            await (await handler(request, exc))(scope, receive, sender)
            return
        await self.app(scope, _replaying(request, receive), send)


def _handler_for(app: Starlette, exc: Exception) -> ExceptionHandler | None:
    """The app's handler for `exc` as FastAPI's `ExceptionMiddleware` picks it (by the
    exception's class hierarchy); None for what only the catch-all `Exception` handler takes."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler = handlers.get(cls)
        if handler is not None:
            return handler
    return None


def _replaying(request: Request, receive: Receive) -> Receive:
    """`receive` for the general path: first the body the fast path already read, if any."""
    body: bytes | None = getattr(request, "_body", None)
    if body is None:
        return receive
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def json_model(request: Request, model: type[M]) -> M | None:
    """The body as `model` when it is plain, valid JSON sent as ``application/json``, else None.

    Parsed exactly as FastAPI parses it (stdlib `json`, the same Python-mode validation), so the
    fast path accepts the same values; whatever it declines FastAPI answers with its own errors.
    """
    if request.headers.get("content-type") != JSON_CONTENT_TYPE:
        return None
    body = await request.body()
    if not body:
        return None
    try:
        # from_attributes as FastAPI's own body validation; any failure is FastAPI's to report.
        return model.model_validate(json.loads(body), from_attributes=True)
    except Exception:
        return None


async def known_caller(request: Request) -> Caller | None:
    """The caller when the request carries a valid key, else None: the general path then
    answers the 401 with its own message."""
    try:
        return await get_caller(request, request.headers.get("authorization"))
    except RouterRefusal:
        return None


async def admitted(request: Request, model: type[M]) -> tuple[M, Caller] | None:
    """A plain, valid body (`json_model`) from a caller with a valid key, counted against the
    key's rate limits (over them: the 429 is raised, as by the route's dependency); None hands
    the request to the general path, before anything was counted."""
    body = await json_model(request, model)
    if body is None:
        return None
    caller = await known_caller(request)
    if caller is None:
        return None
    state = request.app.state
    await enforce_rate_limit(request, caller, state.settings, state.store)
    return body, caller
