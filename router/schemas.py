"""HTTP request and response bodies of the intake API (they also make the OpenAPI document)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from router.records import Priority, RequestError, RequestResult, RouteName, Status, UsageInfo

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# The fields of POST /v1/requests that belong to the router and are not sent upstream.
ROUTER_FIELDS = frozenset(
    {"priority", "deadline_s", "metadata", "idempotency_key", "max_cost_usd", "callback_url"}
)


class ChatMessage(BaseModel):
    """One chat message; unknown OpenAI fields (name, tool_calls, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.model_extra and
                                         self.model_extra.get("tool_calls")):
            raise ValueError("content must be a string or a list of content parts")
        return self


MAX_JSON_DEPTH = 32
INT64 = 2**63


def json_safety_problem(value: Any) -> str | None:
    """Why a parsed JSON body cannot be stored, encoded or sent upstream, or None if it can.

    Checked once at the edge (issue 8) so every later step may assume a sane body: nesting at
    most `MAX_JSON_DEPTH` deep (deeper values break serialisation), finite numbers (``NaN`` and
    ``Infinity`` are not JSON and would silently become null), integers that fit in 64 bits,
    and text (keys too) without lone surrogates. Iterative, so depth cannot exhaust the stack.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        where = path or "body"
        if depth > MAX_JSON_DEPTH:
            return f"{where}: nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _has_lone_surrogate(key):
                    return f"{where}: a key contains a lone surrogate; send valid Unicode"
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if _has_lone_surrogate(item):
                return f"{where}: contains a lone surrogate; send valid Unicode"
        elif isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                return f"{where}: must be a finite number (NaN and Infinity are not JSON)"
        elif isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item < INT64:
            return f"{where}: integer out of range (must fit in 64 bits)"
    return None


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():  # O(1) in CPython: most text needs no encoding attempt
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class ChatCompletionFields(BaseModel):
    """The OpenAI chat-completion fields the router inspects; every other field passes through."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _json_safe(cls, data: Any) -> Any:
        problem = json_safety_problem(data) if isinstance(data, dict) else None
        if problem is not None:
            raise PydanticCustomError("unsafe_json", problem)
        return data

    model: str | None = Field(None, min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stream: bool | None = None
    n: int | None = Field(None, ge=1, le=1)


class SubmitRequest(ChatCompletionFields):
    """Body of ``POST /v1/requests``: an OpenAI chat completion plus routing fields."""

    priority: Priority = "normal"
    deadline_s: float | None = Field(
        None, gt=0, description="Seconds within which a result is needed."
    )
    metadata: dict[str, Any] | None = Field(None, description="Kept on the record, not sent.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$"
    )
    max_cost_usd: Decimal | None = Field(
        None, gt=0, description="Budget; becomes a max_tokens cap from the lane's price."
    )
    callback_url: str | None = Field(None, max_length=2048)

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def openai_body(self) -> dict[str, Any]:
        """The chat-completion body to send upstream (router fields removed, nulls dropped)."""
        data = self.model_dump(mode="json", exclude_none=True)
        for name in ROUTER_FIELDS:
            data.pop(name, None)
        return data


class SubmitResponse(BaseModel):
    id: str
    status: Status
    route: RouteName
    route_reason: str
    priority: Priority
    model: str
    channel: str = Field(description="Redis pub/sub channel of the request's events.")
    events_url: str
    result_url: str
    idempotent_replay: bool = False
    stream_url: str | None = Field(
        None, description="Signed, read-only URL of the request's events, for a browser's "
        "EventSource (no API key needed; expires). Null when ROUTER_STREAM_URL_SECRETS is empty.")


class RequestView(BaseModel):
    """``GET /v1/requests/{id}``: the record, with the result once terminal."""

    id: str
    status: Status
    priority: Priority
    route: RouteName
    route_reason: str
    model: str
    body: dict[str, Any]
    metadata: dict[str, Any] | None
    created_at: float
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    deadline_at: float | None
    attempts: int
    batch_id: str | None
    result: RequestResult | None
    error: RequestError | None
    usage: UsageInfo | None
    cost_usd: Decimal | None
    channel: str
    events_url: str
    stream_url: str | None = Field(
        None, description="A fresh signed, read-only URL of the request's events (see "
        "SubmitResponse.stream_url).")


class CancelResponse(BaseModel):
    id: str
    status: Status
    previous_status: Status | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Errors use OpenAI's shape so OpenAI SDKs raise the right exception class."""

    error: ErrorDetail
