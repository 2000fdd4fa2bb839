"""Errors in OpenAI's wire shape, so the SDK raises the same exception classes it would upstream.

``{"error": {"message", "type", "param", "code"}}`` with the status code that selects the SDK's
exception (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError,
5xx InternalServerError).
"""

from __future__ import annotations

from typing import Any

_DEFAULTS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to perform this request."),
    404: ("invalid_request_error", None, "The requested resource does not exist."),
    409: ("invalid_request_error", "conflict", "The resource is in a conflicting state."),
    413: ("invalid_request_error", "request_too_large", "The request is too large."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests (simulated). Please try again later.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    502: ("server_error", None, "Bad gateway."),
    503: (
        "server_error",
        None,
        "The engine is currently overloaded, please try again later.",
    ),
}


class SimError(Exception):
    """An error answer; raised anywhere in a handler and rendered by the ASGI app."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        d_type, d_code, d_message = _DEFAULTS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
        )
        self.status = status
        self.message = message or d_message
        self.type = type or d_type
        self.param = param
        self.code = code if code is not None else d_code
        self.headers = headers or []
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> SimError:
    return SimError(400, message, param=param, code=code)


def flex_unavailable(retry_after: float | None) -> SimError:
    """OpenAI's answer when flex capacity is exhausted: 429 Resource Unavailable."""
    headers = [] if retry_after is None else [(b"retry-after", f"{retry_after:g}".encode())]
    return SimError(429, "Resource Unavailable: flex processing capacity is temporarily "
                    "exhausted; try again later or use the default service tier.",
                    type="rate_limit_error", code="resource_unavailable", headers=headers)


def flex_not_supported(model: str) -> SimError:
    """The answer for a flex call on a model that has no flex tier."""
    return SimError(400, f"Invalid value for 'service_tier': flex is not available for model "
                    f"'{model}'.", param="service_tier", code="invalid_value")


def not_found(message: str) -> SimError:
    return SimError(404, message)


def injected(status: int, retry_after: float | None) -> SimError:
    """A fault chosen by a directive or a fault rate."""
    headers: list[tuple[bytes, bytes]] = []
    if retry_after is not None:
        headers.append((b"retry-after", f"{retry_after:g}".encode()))
    return SimError(status, headers=headers)
