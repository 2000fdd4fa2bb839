"""The router's errors: one root exception, one enum of codes, no HTTP in sight.

A request the router refuses raises a subclass of `RouterRefusal`; its class says what kind of
refusal it is (bad input, not found, conflict, unavailable...) and its `code` which one exactly.
The API turns each class into an HTTP status in one place (`api.errors`); a Python caller of
`enqueue` gets these exceptions as they are.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every code a refusal can carry (the ``error.code`` of an HTTP answer)."""

    INVALID_REQUEST = "invalid_request"
    INVALID_JSON = "invalid_json"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    CALLBACK_NOT_ALLOWED = "callback_not_allowed"
    BUDGET_TOO_SMALL = "budget_too_small"
    PRIORITY_NOT_SUPPORTED = "priority_not_supported"
    REQUEST_TOO_LARGE = "request_too_large"
    BODY_TOO_LARGE = "body_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    CLIENT_CLOSED = "client_closed"
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    INVALID_METRICS_TOKEN = "invalid_metrics_token"
    INVALID_STREAM_TOKEN = "invalid_stream_token"
    STREAM_TOKEN_EXPIRED = "stream_token_expired"
    STREAM_URLS_OFF = "stream_urls_off"
    NOT_ADMIN = "not_admin"
    NOT_FOUND = "not_found"
    BATCH_NOT_FOUND = "batch_not_found"
    ALREADY_TERMINAL = "already_terminal"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    RATE_LIMIT_REQUESTS = "rate_limit_requests"
    RATE_LIMIT_TOKENS = "rate_limit_tokens"
    QUEUE_UNAVAILABLE = "queue_unavailable"
    DISPATCH_UNAVAILABLE = "dispatch_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


class RouterRefusal(Exception):
    """The root: a request or an operation the router refused, with what to fix."""

    default_code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, param: str | None = None,
                 code: ErrorCode | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code: ErrorCode = code or self.default_code
        self.headers = headers or {}


class InvalidRequest(RouterRefusal):
    """The request itself is wrong (a field, a header, its size); the message says what."""


class Unauthenticated(RouterRefusal):
    """No credentials, or credentials the router does not know."""

    default_code = ErrorCode.INVALID_API_KEY


class Forbidden(RouterRefusal):
    """Known credentials that may not do this."""

    default_code = ErrorCode.NOT_ADMIN


class NotFound(RouterRefusal):
    default_code = ErrorCode.NOT_FOUND


class Conflict(RouterRefusal):
    """The request clashes with the state of another (an idempotency key, a finished request)."""

    default_code = ErrorCode.IDEMPOTENCY_CONFLICT


class TooLarge(RouterRefusal):
    default_code = ErrorCode.BODY_TOO_LARGE


class TimedOut(RouterRefusal):
    default_code = ErrorCode.REQUEST_TIMEOUT


class RateLimited(RouterRefusal):
    """Over a limit of the caller's API key; `headers` say when to come back."""

    default_code = ErrorCode.RATE_LIMIT_REQUESTS


class Unavailable(RouterRefusal):
    """A part the router needs (Redis, a queue) is away: retry, nothing was accepted."""

    default_code = ErrorCode.QUEUE_UNAVAILABLE
