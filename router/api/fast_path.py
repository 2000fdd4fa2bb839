"""A route class that tries a hand-written fast path before FastAPI's general request handler.

Why: FastAPI solves a route's parameters and dependencies generically on every request
(content-type parsing through `email.message`, header extraction, per-dependency cache keys,
nested dependency resolution): about a quarter of the CPU of a ``POST /v1/requests``
(benchmark 3, issue 7). The fast path handles only the common, well-formed request and returns
None for anything else, so every unusual request (no or another content type, bad JSON, invalid
fields, a wrong key) goes through FastAPI's general handler and gets exactly its answer. The
route's declared signature still makes the OpenAPI document and serves as that general path.

A fast path must have no side effect before it decides to return None: the general handler
then runs the whole request again (the body itself is cached on the `Request`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from router.api.deps import Caller, get_caller
from router.api.ratelimit import enforce_rate_limit
from router.intake import IntakeError

M = TypeVar("M", bound=BaseModel)
FastHandler = Callable[[Request], Awaitable[Response | None]]
JSON_CONTENT_TYPE = "application/json"


class FastPathRoute(APIRoute):
    """An `APIRoute` that first offers each request to `fast` (set by `with_fast_path`)."""

    fast: FastHandler

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        general = super().get_route_handler()
        fast = type(self).fast

        async def handler(request: Request) -> Response:
            response = await fast(request)
            return response if response is not None else await general(request)

        return handler


def with_fast_path(fast: FastHandler) -> type[APIRoute]:
    """A route class (for ``route_class_override``) whose requests try `fast` first."""
    return type("FastPathRoute", (FastPathRoute,), {"fast": staticmethod(fast)})


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
    except IntakeError:
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
    await enforce_rate_limit(request, caller, state.settings, state.redis)
    return body, caller
