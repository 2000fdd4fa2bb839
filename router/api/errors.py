"""Error responses in OpenAI's shape, so clients (and OpenAI SDKs) see clear 4xx messages."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid_router.router.core.errors import (
    Conflict,
    ErrorCode,
    Forbidden,
    InvalidRequest,
    NotFound,
    RateLimited,
    RouterRefusal,
    TimedOut,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from hybrid_router.router.core.logs import get_logger

log = get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


# The one place a refusal becomes an HTTP status.
HTTP_STATUS: dict[type[RouterRefusal], int] = {
    InvalidRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    TimedOut: 408,
    Conflict: 409,
    TooLarge: 413,
    RateLimited: 429,
    Unavailable: 503,
}


def status_of(exc: RouterRefusal) -> int:
    """The HTTP status of a refusal: that of the nearest class in `HTTP_STATUS`."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 400


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) if parts else "body"


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str]:
    """One message naming every bad field (first field as `param`)."""
    problems = []
    first_param = "body"
    for i, err in enumerate(exc.errors()):
        loc = tuple(err.get("loc", ()))
        param = _loc_to_param(loc)
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            problems.append(f"body is not valid JSON ({ctx.get('error', 'parse error')})")
            param = "body"
        elif err.get("type") in ("unsafe_json", "endpoint_body"):
            # `json_safety_problem` and `endpoint_problem` name the field first:
            # "messages.0.content: ...", "input: ...".
            message = str(err.get("msg"))
            param = message.split(":", 1)[0] if ":" in message else "body"
            problems.append(message)
        elif err.get("type") == "model_attributes_type" or (
            err.get("type") == "dict_type" and param == "body"
        ):
            problems.append("body must be a JSON object")
        else:
            problems.append(f"{param}: {err.get('msg')}")
        if i == 0:
            first_param = param
    return "; ".join(problems[:10]), first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        content_type = request.headers.get("content-type", "")
        if param == "body" and "json" not in content_type:
            message += f" (sent as {content_type or 'no content type'}: send JSON with " \
                       "'Content-Type: application/json')"
        return error_response(400, message, param=param, code=ErrorCode.INVALID_REQUEST)

    @app.exception_handler(RouterRefusal)
    async def _refused(_: Request, exc: RouterRefusal) -> JSONResponse:
        return error_response(status_of(exc), exc.message, exc.param, exc.code,
                              exc.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return error_response(413, str(exc.detail), param="body", code=ErrorCode.BODY_TOO_LARGE)
        if exc.status_code == 408:  # hybrid_router.router.api.http_guards: the body did not arrive in time
            return error_response(408, str(exc.detail), param="body", code=ErrorCode.REQUEST_TIMEOUT,
                                  headers=dict(exc.headers or {}))
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when the JSON parser itself gives up (e.g. nesting 10,000 deep).
            return error_response(400, "body could not be parsed as JSON (malformed, or nested "
                                  "too deeply)", param="body", code=ErrorCode.INVALID_JSON)
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis away (restart, failover, network): a retryable 503, not a 500.
        log.warning("redis unavailable", path=request.url.path, error=str(exc)[:200])
        return error_response(503, "the request store (Redis) is unavailable; retry shortly "
                              "(with the same idempotency_key, to be safe)",
                              code=ErrorCode.STORE_UNAVAILABLE, headers={"retry-after": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return error_response(500, "internal error; it has been logged", code=ErrorCode.INTERNAL_ERROR)
