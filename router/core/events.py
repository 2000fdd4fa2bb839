"""The per-request event protocol (DESIGN.md): bodies, parsing and the replay log.

An event is a JSON object with a ``type`` and a ``seq``. Producers build the body without
``seq`` (see `hybrid_router.router.core.lua`, which numbers it); consumers read it back with `parse_event`.
The replay log is a Redis Stream whose entry ids are ``0-<seq>``, so "everything after seq N"
is ``XRANGE key (0-N +`` and an SSE ``Last-Event-ID`` maps straight onto it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

import orjson

from hybrid_router.router.core.records import dumps
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.tool_calls import merge_deltas

EventType = Literal["accepted", "queued", "submitted", "token", "tool_calls", "response",
                    "lane_changed", "done", "error", "cancelled"]
FINAL_EVENT_TYPES: frozenset[str] = frozenset({"done", "error", "cancelled"})


def accepted(route: str, priority: str) -> str:
    return dumps({"type": "accepted", "route": route, "priority": priority})


def queued(batch_id: str | None = None, reason: str | None = None) -> str:
    body: dict[str, Any] = {"type": "queued", "batch_id": batch_id}
    if reason:
        body["reason"] = reason
    return dumps(body)


def submitted(batch_id: str) -> str:
    return dumps({"type": "submitted", "batch_id": batch_id})


def started() -> str:
    """Not a terminal or token event: the stream worker has begun the upstream call."""
    return dumps({"type": "started"})


def token(content: str) -> str:
    return dumps({"type": "token", "content": content})


def tool_calls(deltas: list[dict[str, Any]]) -> str:
    """Tool-call deltas as OpenAI streams them (``delta.tool_calls``), fragments of one call
    joined (`hybrid_router.router.core.tool_calls.merge_deltas`)."""
    return dumps({"type": "tool_calls", "tool_calls": merge_deltas(deltas)})


def response_event(event: dict[str, Any]) -> str:
    """One event of an upstream Responses stream (``response.created``,
    ``response.output_text.delta``, ...), kept as the upstream sent it under ``event``."""
    return dumps({"type": "response", "event": event})


# What a stream has produced and not yet published: text, a list of tool-call deltas, or one
# upstream Responses event (a dict).
Produced = str | list[dict[str, Any]] | dict[str, Any]


def produced_events(parts: list[Produced]) -> list[str]:
    """The events of `parts`, in order: each run of text is one ``token`` event, each run of
    tool-call deltas one ``tool_calls`` event, each Responses event one ``response`` event."""
    out: list[str] = []
    i = 0
    while i < len(parts):
        j = i
        part = parts[i]
        if isinstance(part, dict):
            out.append(response_event(part))
            i += 1
            continue
        if isinstance(part, str):
            while j < len(parts) and isinstance(parts[j], str):
                j += 1
            out.append(token("".join(p for p in parts[i:j] if isinstance(p, str))))
        else:
            deltas: list[dict[str, Any]] = []
            while j < len(parts):
                part = parts[j]
                if not isinstance(part, list):
                    break
                deltas += part
                j += 1
            out.append(tool_calls(deltas))
        i = j
    return out


def done(
    finish_reason: str | None,
    usage: dict[str, Any] | None,
    cost_usd: Decimal | None,
    content_length: int,
    service_tier: str | None = None,
) -> str:
    body: dict[str, Any] = {
        "type": "done",
        "status": "completed",
        "finish_reason": finish_reason,
        "usage": usage,
        "cost": cost_usd,
        "content_length": content_length,
    }
    if service_tier is not None:
        body["service_tier"] = service_tier
    return dumps(body)


def error(code: str, message: str, retryable: bool = False) -> str:
    return dumps({"type": "error", "code": code, "message": message, "retryable": retryable})


def cancelled() -> str:
    return dumps({"type": "cancelled"})


def parse_event(data: bytes | str) -> dict[str, Any]:
    """Decode one event as stored in the replay log or published on the channel."""
    value = orjson.loads(data)
    if not isinstance(value, dict) or "type" not in value or "seq" not in value:
        raise ValueError(f"not an event: {data!r}")
    return value


# The largest seq a client may resume after: replay log ids are ``0-<seq>`` and Redis stream ids
# are 64-bit unsigned, so a larger cursor would be refused by Redis ("Invalid stream ID")
# after the SSE headers were sent. Kept to signed 64 bits, as every integer the API takes.
MAX_SEQ = 2**63 - 1


def stream_id_after(seq: int) -> str:
    """The exclusive XRANGE/XREAD start for 'events after `seq`'."""
    return f"0-{seq}"


def seq_of_stream_id(entry_id: bytes | str) -> int:
    return int(text(entry_id).split("-", 1)[1])
