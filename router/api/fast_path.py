"""Fast paths for the hot routes: the route's own declared dependencies, solved by a plan made
once, offered each request before FastAPI's routing.

Why: FastAPI solves a route's parameters and dependencies generically on every request
(content-type parsing through `email.message`, per-parameter validation, per-dependency cache
keys) and finds the route by walking every included router through three more middlewares:
together about half of the CPU of a ``POST /v1/requests``. A route opts in with
``route_class_override=FastPathRoute``; `FastPaths` (installed by `create_app`, inside the body
size limit) turns the route's `dependant` (FastAPI's own reading of its declared signature:
parameters, ``Depends`` and route-level ``dependencies``) into a `_Plan` that calls the same
dependencies, in FastAPI's order, with FastAPI's per-request cache, then the endpoint. So a
dependency added to a route runs on the fast path too; one the plan cannot solve (a generator,
a cookie, a form, security scopes...) makes the app fail at startup, naming it.

The plan serves only the plain request: a body of plain, valid JSON sent as
``application/json`` (`json_model`), and, of the parameters, only strings the route takes as
they are (a parameter that needs converting or checking, e.g. ``?after=3``, must be absent).
Anything else goes on through FastAPI, which answers exactly as without a fast path (the body
already read is handed on): that decision is made before any dependency runs. An exception a
dependency or the endpoint raises is answered by the app's own exception handlers, as FastAPI
would answer it. The endpoint must return a `Response` (FastAPI's response-model encoding is
not repeated here).

`with_fast_path(fast)` gives a route a hand-written fast path instead, allowed only on a route
that declares no dependency (there would be nothing to keep in step).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

M = TypeVar("M", bound=BaseModel)
FastHandler = Callable[[Request], Awaitable[Response | None]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
JSON_CONTENT_TYPE = "application/json"
_DECLINED = object()


class FastPathRoute(APIRoute):
    """An `APIRoute` that `FastPaths` serves with a plan of its declared dependencies."""

    fast: FastHandler | None = None


def with_fast_path(fast: FastHandler) -> type[APIRoute]:
    """A route class (for ``route_class_override``) whose requests try `fast` first: it returns
    None to hand the request to FastAPI, and must have no side effect before it decides."""
    return type("FastPathRoute", (FastPathRoute,), {"fast": staticmethod(fast)})


def _unsolvable(dependant: Dependant) -> list[str]:
    """What in `dependant` a plan cannot solve (FastAPI's general path can)."""
    call, body = dependant.call, dependant.body_params
    return [name for name, value in (
        ("no callable", call is None),
        ("a cookie parameter", dependant.cookie_params),
        ("a WebSocket", dependant.websocket_param_name),
        ("a Response parameter", dependant.response_param_name),
        ("BackgroundTasks", dependant.background_tasks_param_name),
        ("security scopes", dependant.security_scopes_param_name or dependant.own_oauth_scopes),
        ("a concurrency limit", dependant.concurrency),
        ("a generator", inspect.isgeneratorfunction(call) or inspect.isasyncgenfunction(call)),
        ("a body other than one JSON model", body and not (
            len(body) == 1 and isinstance(body[0].field_info.annotation, type)
            and issubclass(body[0].field_info.annotation, BaseModel))),
    ) if value]


class _Plan:
    """A route's parameters, dependencies and endpoint as a list of calls over numbered slots:
    slot 0 is the request, then each parameter's value, then each call's result, in the order
    FastAPI makes the calls (sub-dependencies first, route-level ``dependencies`` before the
    parameters'; a dependency with ``use_cache`` called once per request)."""

    def __init__(self, route: APIRoute) -> None:
        self.where = f"{','.join(sorted(route.methods or ()))} {route.path}"
        self.params: list[tuple[str, str, Any, bool]] = []  # where from, alias, default, plain
        self.body: type[BaseModel] | None = None
        self.steps: list[tuple[Callable[..., Any], bool, tuple[tuple[str, int], ...]]] = []
        self._slots: dict[tuple[str, str], int] = {}
        self._cached: dict[Callable[..., Any], int] = {}
        self._add(route.dependant)
        base = len(self.params) + 1  # results come after the request and the parameters
        self.steps = [(call, is_async, tuple((name, slot if slot >= 0 else base - slot - 1)
                                             for name, slot in args))
                      for call, is_async, args in self.steps]

    def _slot(self, kind: str, field: Any) -> int:
        key = (kind, field.alias)
        if key not in self._slots:
            info = field.field_info
            plain = info.annotation in (str, str | None) and not info.metadata
            default = _DECLINED if info.is_required() else field.default
            self.params.append((kind, field.alias, default, plain))
            self._slots[key] = len(self.params)
        return self._slots[key]

    def _add(self, dependant: Dependant) -> int:
        """Add the calls of `dependant` and what it depends on; the slot of its result."""
        unsolvable = _unsolvable(dependant)
        if unsolvable:
            raise ValueError(f"{self.where}: the fast path cannot solve {dependant.call!r} "
                             f"({', '.join(unsolvable)})")
        args: list[tuple[str, int]] = []
        for sub in dependant.dependencies:
            slot = self._cached.get(sub.call) if sub.use_cache and sub.call else None
            if slot is None:
                slot = self._add(sub)
                if sub.use_cache and sub.call is not None:
                    self._cached.setdefault(sub.call, slot)
            if sub.name is not None:
                args.append((sub.name, slot))
        args += [(name, 0) for name in (dependant.request_param_name,
                                        dependant.http_connection_param_name) if name]
        for kind, fields in (("path", dependant.path_params), ("query", dependant.query_params),
                             ("header", dependant.header_params)):
            args += [(field.name, self._slot(kind, field)) for field in fields]
        if dependant.body_params:
            body = dependant.body_params[0]
            if self.body is not None and ("body", body.alias) not in self._slots:
                raise ValueError(f"{self.where}: the fast path takes one JSON body")
            self.body = cast(type[BaseModel], body.field_info.annotation)
            args.append((body.name, self._slot("body", body)))
        call = cast(Callable[..., Any], dependant.call)
        is_async = inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
            getattr(call, "__call__", None))  # noqa: B004 (an instance's async __call__)
        self.steps.append((call, is_async, tuple(args)))
        return -len(self.steps)  # the result of step k is -(k + 1) until renumbered

    async def values(self, request: Request) -> list[Any] | None:
        """Slot 0 and the parameters' slots, or None when FastAPI must solve them."""
        slots: list[Any] = [request]
        model = None
        if self.body is not None:
            model = await json_model(request, self.body)
            if model is None:
                return None
        headers, path = request.headers, request.path_params
        query = request.query_params if request.scope.get("query_string") else {}
        for kind, alias, default, plain in self.params:
            if kind == "body":
                slots.append(model)
                continue
            source = headers if kind == "header" else query if kind == "query" else path
            value = source.get(alias, default)
            if value is _DECLINED or (not plain and value is not default):
                return None
            slots.append(value)
        return slots

    async def answer(self, request: Request) -> Response | None:
        """The endpoint's response, after its dependencies; None to leave it to FastAPI."""
        slots = await self.values(request)
        if slots is None:
            return None
        for call, is_async, args in self.steps:
            kwargs = {name: slots[slot] for name, slot in args}
            slots.append(await call(**kwargs) if is_async
                         else await run_in_threadpool(call, **kwargs))
        if not isinstance(slots[-1], Response):
            raise TypeError(f"{self.where}: the endpoint returned {type(slots[-1])!r}, "
                            "not a Response")
        return slots[-1]


def _fast_handler(route: FastPathRoute) -> FastHandler:
    """The route's hand-written fast path, else the plan of its declared dependencies."""
    fast = type(route).fast
    if fast is not None:
        if route.dependant.dependencies:
            raise ValueError(f"{route.path}: a hand-written fast path would skip the route's "
                             "dependencies; leave it to the plan of its declared ones")
        return fast
    return _Plan(route).answer


@dataclass(frozen=True)
class _Entry:
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]
    fast: FastHandler


class FastPaths:
    """ASGI middleware: a request for a `FastPathRoute` (method and path) goes to its plan.

    `routes` are those of the routers the app includes at its root (their paths are then the
    app's). They are matched in order, on the same compiled path patterns FastAPI uses; put a
    fast path only on a route whose method and path no earlier route can also match.
    """

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.table: dict[str, list[_Entry]] = {}
        for route in routes:
            if isinstance(route, FastPathRoute):
                entry = _Entry(route.path_regex, route.param_convertors, _fast_handler(route))
                for method in route.methods or ():
                    self.table.setdefault(method, []).append(entry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["app"].dependency_overrides:
            entries = self.table.get(scope["method"])
            if entries:
                path = _route_path(scope)
                for entry in entries:
                    match = entry.regex.match(path)
                    if match is not None:
                        scope["path_params"] = {name: entry.convertors[name].convert(value)
                                                for name, value in match.groupdict().items()}
                        await self._offer(entry.fast, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _offer(self, fast: FastHandler, scope: Scope, receive: Receive, send: Send
                     ) -> None:
        request = Request(scope, receive)
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            response = await fast(request)
            if response is not None:
                await response(scope, receive, sender)
                return
        except Exception as exc:
            handler = _handler_for(scope["app"], exc)
            if handler is None or started:
                raise  # unexpected: ServerErrorMiddleware answers 500, as for any route
            await (await handler(request, exc))(scope, receive, sender)
            return
        # Declined: FastAPI reads the body again (`Request.body` kept what was read, or reads it).
        await self.app(scope, _replaying(await request.body(), receive), send)


def _route_path(scope: Scope) -> str:
    """The path the app's routes match: the request's, less the app's root path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def _handler_for(app: Starlette, exc: Exception) -> ExceptionHandler | None:
    """The app's handler for `exc` as FastAPI's `ExceptionMiddleware` picks it (by the
    exception's class hierarchy); None for what only the catch-all `Exception` handler takes."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        handler: ExceptionHandler | None = handlers.get(cls)
        if handler is not None:
            return handler
    return None


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for the general path: first the body, then the client's messages."""
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
