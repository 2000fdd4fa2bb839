"""HTTP request and response bodies of the intake API (they also make the OpenAPI document)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from hybrid_router.router.core.callback_policy import callback_url_problem
from hybrid_router.router.core.endpoints import CHAT, EMBEDDINGS, RESPONSES, Endpoint
from hybrid_router.router.core.records import Priority, RequestError, RequestResult, RouteName, UsageInfo
from hybrid_router.router.core.states import Status

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# The fields of POST /v1/requests that belong to the router and are not sent upstream.
ROUTER_FIELDS = frozenset(
    {"priority", "deadline_s", "metadata", "idempotency_key", "max_cost_usd", "callback_url",
     "endpoint"}
)
MAX_EMBEDDING_INPUTS = 2048


# An assistant message may carry one of these instead of content (OpenAI's own rule).
_ASSISTANT_WITHOUT_CONTENT = ("tool_calls", "function_call", "audio", "refusal")


class ChatMessage(BaseModel):
    """One chat message; unknown OpenAI fields (name, tool_calls, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: Role
    # Absent or null only in an assistant message that holds tool calls (or a function call,
    # audio or a refusal), as the openai SDK may send an agent's previous turn.
    content: str | list[dict[str, Any]] | None

    @model_validator(mode="before")
    @classmethod
    def _assistant_content_may_be_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data and data.get("role") == "assistant" \
                and any(data.get(k) for k in _ASSISTANT_WITHOUT_CONTENT):
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        extra = self.model_extra or {}
        if self.content is None and not (
                self.role == "assistant" and any(extra.get(k) for k in _ASSISTANT_WITHOUT_CONTENT)):
            raise ValueError("content must be a string or a list of content parts (it may be "
                             "null only in an assistant message with tool_calls)")
        return self


MAX_BUDGET_USD = Decimal(10**9)
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_.:\-]{1,200}$"
MAX_JSON_DEPTH = 32
INT64 = 2**63


def json_safety_problem(value: Any) -> str | None:
    """Why a parsed JSON body cannot be stored, encoded or sent upstream, or None if it can.

    Checked once at the edge so every later step may assume a sane body: nesting at
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

    # Strict types: OpenAI refuses ``"max_tokens": "10"`` or ``true`` and
    # ``"stream": "yes"``, so the router does too, rather than coerce them.
    model: str | None = Field(None, min_length=1, max_length=256)
    # Chat completions send `messages`; the Responses API and embeddings send `input` (checked
    # against the request's endpoint by `SubmitRequest`).
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=10_000)
    input: str | list[Any] | None = Field(
        None, description="Responses: a string or input items; embeddings: a string, strings, "
        "token ids or token-id arrays (at most 2048 items).")
    max_tokens: int | None = Field(None, gt=0, strict=True)
    max_completion_tokens: int | None = Field(None, gt=0, strict=True)
    stream: bool | None = Field(None, strict=True)
    # The Responses API's output cap and embeddings' options (checked, then sent as they are).
    max_output_tokens: int | None = Field(None, gt=0, strict=True)
    dimensions: int | None = Field(None, gt=0, le=65_536, strict=True)
    encoding_format: Literal["float", "base64"] | None = None
    n: int | None = Field(None, ge=1, le=1, strict=True,
                          description="Only 1: the router relays one choice.")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        None, description="The upstream tier to use (honoured, billed as served); `auto` or "
        "absent: the router chooses the cheapest lane that meets the deadline.")


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def endpoint_problem(endpoint: str, body: ChatCompletionFields) -> str | None:
    """Why `body` is not a request of `endpoint` (None when it is)."""
    if endpoint == CHAT:
        if body.messages is None:
            return "messages: required for /v1/chat/completions (a non-empty list)"
        return None
    if body.messages is not None:
        return f"messages: not a field of {endpoint}; send the prompt as input"
    value = body.input
    if value is None or value == "" or value == []:
        return f"input: required for {endpoint} (a non-empty string or list)"
    if endpoint == RESPONSES:
        if isinstance(value, list) and not all(isinstance(i, dict) for i in value):
            return "input: a string or a list of input items (objects)"
        return None
    if body.stream:
        return "stream: embeddings are not streamed; leave stream out"
    if isinstance(value, str) or _is_tokens(value):
        return None
    if len(value) > MAX_EMBEDDING_INPUTS:
        return f"input: at most {MAX_EMBEDDING_INPUTS} items in one embeddings request"
    if all(isinstance(i, str) and i for i in value) or all(_is_tokens(i) for i in value):
        return None
    return ("input: a string, a list of non-empty strings, a list of token ids or a list of "
            "token-id lists")


class SubmitRequest(ChatCompletionFields):
    """Body of ``POST /v1/requests``: an OpenAI request (chat completion by default) plus
    routing fields."""

    endpoint: Endpoint = Field(
        CHAT, description="The upstream endpoint the body is for: /v1/chat/completions "
        "(default, `messages`), /v1/responses or /v1/embeddings (`input`).")
    priority: Priority = "normal"
    deadline_s: float | None = Field(
        None, gt=0, strict=True, description="Seconds within which a result is needed."
    )
    metadata: dict[str, Any] | None = Field(None, description="Kept on the record, not sent.")
    idempotency_key: str | None = Field(
        None, min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY_PATTERN
    )
    max_cost_usd: Decimal | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="Budget; becomes a max_tokens cap from the lane's price. A budget above "
        f"{MAX_BUDGET_USD} USD is taken as {MAX_BUDGET_USD} (no practical limit).",
    )
    callback_url: str | None = Field(None, max_length=2048)

    @field_validator("max_cost_usd")
    @classmethod
    def _bounded_budget(cls, value: Decimal | None) -> Decimal | None:
        # Decimal keeps any exponent ("1e999999999999"), but arithmetic on it overflows: a
        # budget too big to matter is no limit, at a size every later step can compute with.
        if value is not None and value > MAX_BUDGET_USD:
            return MAX_BUDGET_USD
        return value

    @field_validator("callback_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        problem = None if value is None else callback_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _fits_endpoint(self) -> SubmitRequest:
        problem = endpoint_problem(self.endpoint, self)
        if problem is not None:
            raise PydanticCustomError("endpoint_body", problem)
        return self

    def dump_as_sent(self) -> dict[str, Any]:
        """The request as the client sent it (JSON mode): every field it set, nulls inside
        messages and pass-through fields kept (an assistant turn's ``content: null`` stays),
        and only the router's own typed fields dropped when null."""
        data = self.model_dump(mode="json", exclude_unset=True)
        for name in _TYPED_FIELDS:
            if data.get(name, 0) is None:
                del data[name]
        return data

    def openai_body(self) -> dict[str, Any]:
        """The chat-completion body to send upstream (router fields removed)."""
        data = self.dump_as_sent()
        for name in ROUTER_FIELDS:
            data.pop(name, None)
        return data


_TYPED_FIELDS = frozenset(SubmitRequest.model_fields)


class ResponsesRequest(SubmitRequest):
    """Body of the drop-in ``POST /v1/responses``: a Responses API request (+ ``priority``)."""

    endpoint: Literal["/v1/responses"] = RESPONSES  # type: ignore[assignment]


class EmbeddingsRequest(SubmitRequest):
    """Body of the drop-in ``POST /v1/embeddings``: an embeddings request (+ ``priority``)."""

    endpoint: Literal["/v1/embeddings"] = EMBEDDINGS  # type: ignore[assignment]


class SubmitResponse(BaseModel):
    id: str
    status: Status
    route: RouteName
    route_reason: str
    service_tier: str | None = Field(
        None, description="The tier asked of the upstream (default, flex, priority); null on "
        "the batch lane.")
    expected_latency_s: float | None = Field(
        None, description="The lane's expected latency the choice was judged on (seconds).")
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
    service_tier: str | None = None
    served_tier: str | None = None
    expected_latency_s: float | None = None
    model: str
    endpoint: Endpoint = CHAT
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
