"""The request record: what Redis holds for each accepted request, and its states.

Its states and their moves are defined once, in `core.states`.
"""

from __future__ import annotations

import time
import zlib
from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field

from hybrid_router.router.core.endpoints import CHAT, Endpoint, batch_queue
from hybrid_router.router.core.states import TERMINAL, Status

Priority = Literal["high", "normal", "low"]
RouteName = Literal["stream", "flex", "batch"]
# The lanes that run on the stream engine (a plain upstream call, streamed token by token).
STREAMED_ROUTES: frozenset[str] = frozenset({"stream", "flex"})


JSON_FIELDS = ("body", "result", "error", "metadata", "usage")
_JSON_FIELDS = JSON_FIELDS
# A finished request's compact record (hybrid_router.router.core.replay): its fields but a few in one field,
# zlib-compressed JSON, under a prefix no JSON value starts with.
PACKED_FIELD = "z"
PACKED_PREFIX = b"\x00z1"
REPLAY = "_replay"  # the replay's key among the packed fields
_FLOAT_FIELDS = (
    "created_at",
    "started_at",
    "first_token_at",
    "finished_at",
    "deadline_at",
    "expected_latency_s",
)


def now() -> float:
    """Wall-clock seconds; one function so timestamps are taken the same way everywhere."""
    return time.time()


def dumps(value: Any) -> str:
    """JSON text of a value (orjson, Decimal as a string)."""
    return orjson.dumps(value, default=_default).decode()


def dumps_bytes(value: Any) -> bytes:
    """`dumps` as UTF-8 bytes, for a value that goes straight to Redis (no decode, re-encode)."""
    return orjson.dumps(value, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def pack(fields: dict[str, Any]) -> bytes:
    return PACKED_PREFIX + zlib.compress(orjson.dumps(fields), 6)


def unpack(value: bytes | str) -> dict[str, Any]:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    if not raw.startswith(PACKED_PREFIX):
        raise ValueError("not a packed record")
    data = orjson.loads(zlib.decompress(raw[len(PACKED_PREFIX):]))
    if not isinstance(data, dict):
        raise ValueError("not a packed record")
    return data


def unpack_record(raw: dict[Any, Any]) -> dict[str, Any]:
    """A record's fields as `RequestRecord` reads them (JSON fields still text), from a hash
    that may be compact: the packed fields, then the plain ones over them (a field written
    after the compaction, e.g. a late bill, wins)."""
    fields: dict[str, Any] = {}
    packed = raw[PACKED_FIELD] if PACKED_FIELD in raw else raw.get(PACKED_FIELD.encode())
    if packed is not None:
        for name, value in unpack(packed).items():
            if name != REPLAY:
                fields[name] = orjson.dumps(value).decode() if name in JSON_FIELDS else value
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else key
        if name != PACKED_FIELD:
            fields[name] = value.decode() if isinstance(value, bytes) else value
    return fields


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class RequestResult(BaseModel):
    """What a completed request produced: the assistant message and how it ended."""

    content: str
    finish_reason: str | None = None
    usage: UsageInfo | None = None
    message: dict[str, Any] | None = None
    # Responses and embeddings: the upstream's answer in the endpoint's own shape (the
    # Response object, the embeddings ``list``).
    response: dict[str, Any] | None = None


class RequestError(BaseModel):
    code: str
    message: str
    retryable: bool = False


class RequestRecord(BaseModel):
    """One accepted request, as stored in the Redis hash ``Keys.record(id)``."""

    id: str
    tenant: str
    priority: Priority
    route: RouteName
    route_reason: str = ""
    # The tier asked of the upstream (``default``, ``flex``, ``priority``; None on the batch
    # lane), the tier the upstream says served it (what is billed), and the expected latency
    # the lane was chosen on (seconds).
    service_tier: str | None = None
    served_tier: str | None = None
    expected_latency_s: float | None = None
    may_batch: bool | None = None  # False: its answer is awaited on the call (the drop-in)
    status: Status
    model: str
    endpoint: Endpoint = CHAT
    body: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    idempotency_key: str | None = None
    callback_url: str | None = None
    created_at: float
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    attempts: int = 0
    batch_id: str | None = None
    result: RequestResult | None = None
    error: RequestError | None = None
    usage: UsageInfo | None = None
    cost_usd: Decimal | None = None
    content_tokens_relayed: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def batch_queue(self) -> str:
        """Its batch queue's name (`hybrid_router.router.core.endpoints.batch_queue`): one per endpoint and model."""
        return batch_queue(self.endpoint, self.model)

    def to_hash(self) -> dict[str, str]:
        """Flat string fields for HSET (None values are left out)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(mode="json", exclude_none=True).items():
            if name == "endpoint" and value == CHAT:
                continue  # the default: most records leave it out
            out[name] = dumps(value) if name in _JSON_FIELDS else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> RequestRecord:
        data: dict[str, Any] = {}
        if PACKED_FIELD in raw or PACKED_FIELD.encode() in raw:
            raw = unpack_record(raw)
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            text = value.decode() if isinstance(value, bytes) else value
            if name in _JSON_FIELDS:
                data[name] = orjson.loads(text)
            else:
                data[name] = text
        return cls.model_validate(data)
