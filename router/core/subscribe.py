"""Following a request's events straight from Redis: every event once, in order, however late.

The raw protocol (for apps that read Redis themselves, in any language):

- **Replay log**: a Redis Stream at ``Keys.events(id)`` = ``<prefix>:ev:{<id>}``. Each entry has
  the id ``0-<seq>`` and one field ``d``: the event as JSON (``{"seq": 7, "type": "token",
  "content": " hello"}``). "Everything after seq N" is ``XRANGE <key> (0-N +`` (or ``XREAD
  STREAMS <key> 0-N``). The log keeps ``Settings.replay_maxlen`` entries at most and expires
  ``Settings.replay_ttl_s`` after the last event; once a request is over,
  ``Settings.replay_grace_s`` later, the log is compacted into the record (`hybrid_router.router.core.replay`):
  the log is gone and `compacted_events` gives what was left after your seq (the remaining
  text as one token event, then the final event).
- **Live channel**: pub/sub ``Keys.channel(id)`` = ``<prefix>:chan:<id>``; every event is
  published there, with the same JSON, at the moment it is appended to the log (one Lua script
  does both, so the log and the channel never disagree).
- **Final events**: ``done``, ``error`` and ``cancelled``; nothing follows them.

To miss nothing: SUBSCRIBE first and wait for the confirmation, then read the log after your last
seq, then take live messages, dropping any seq you already have. A gap in the live seqs (a
message published between the read and the subscription cannot be lost, but a reconnect can
cause one) is filled from the log. `follow_events` / `afollow_events` do exactly this.

A slow subscriber never slows the producer: the producer's writes are plain commands, and
Redis buffers pub/sub output per subscriber (``client-output-buffer-limit pubsub``); a
subscriber that falls too far behind is disconnected by Redis — not the producer — and simply
resumes from the log with its last seq.

`tail_log` is the other way to follow: ``XREAD BLOCK`` on the log alone (no pub/sub), race-free
because the log is the source of truth. (The HTTP API follows with its shared pub/sub connection,
`hybrid_router.router.core.event_hub`, on every kind of Redis URL.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.events import FINAL_EVENT_TYPES, parse_event, seq_of_stream_id, stream_id_after
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.records import PACKED_FIELD
from hybrid_router.router.core.replay import compacted_events
from hybrid_router.router.core.states import TERMINAL_BYTES
from hybrid_router.settings import Settings

_POLL_S = 1.0


def _log_events(entries: list[Any] | None) -> list[dict[str, Any]]:
    return [parse_event(event_data(fields)) for _entry_id, fields in entries or []]


def event_data(fields: Any) -> Any:
    """The ``d`` field of a log entry: a dict from redis-py, a flat list from hiredis."""
    if isinstance(fields, dict):
        return fields.get(b"d") if b"d" in fields else fields.get("d")
    return dict(zip(fields[::2], fields[1::2], strict=False)).get(b"d")


def finished(status: Any) -> bool:
    """Whether a record status (raw from Redis) means no event will follow."""
    return status is None or status in TERMINAL_BYTES


def _remaining(deadline: float | None) -> float:
    if deadline is None:
        return _POLL_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no final event before the timeout")
    return min(left, _POLL_S)


def follow_events(
    client: redis.Redis,
    settings: Settings,
    request_id: str,
    after_seq: int = 0,
    timeout: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the request's events after `after_seq`, live, until a final event.

    Raises `TimeoutError` when `timeout` seconds pass without reaching a final event.
    """
    keys = Keys(settings.key_prefix)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after_seq
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(keys.channel(request_id))
        while True:  # wait for the subscription to be in place before reading the log
            message = pubsub.get_message(timeout=_remaining(deadline))
            if message is not None and message["type"] == "subscribe":
                break

        def backlog() -> list[dict[str, Any]]:
            events = _log_events(client.xrange(keys.events(request_id),
                                               min=f"({stream_id_after(last)}", max="+"))
            return events or compacted_events(
                client.hget(keys.record(request_id), PACKED_FIELD), last)

        pending = backlog()
        if not pending and finished(client.hget(keys.record(request_id), "status")):
            return  # terminal, and nothing after `after_seq`: nothing more will come
        while True:
            for event in pending:
                if event["seq"] <= last:
                    continue
                last = event["seq"]
                yield event
                if event["type"] in FINAL_EVENT_TYPES:
                    return
            message = pubsub.get_message(timeout=_remaining(deadline))
            if message is None or message["type"] != "message":
                pending = []
                continue
            event = parse_event(message["data"])
            pending = backlog() if event["seq"] > last + 1 else [event]
    finally:
        pubsub.close()


async def afollow_events(
    client: aioredis.Redis,
    settings: Settings,
    request_id: str,
    after_seq: int = 0,
    timeout: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The async twin of `follow_events` (redis.asyncio client)."""
    keys = Keys(settings.key_prefix)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = after_seq
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(keys.channel(request_id))
        while True:
            message = await pubsub.get_message(timeout=_remaining(deadline))
            if message is not None and message["type"] == "subscribe":
                break

        async def backlog() -> list[dict[str, Any]]:
            events = _log_events(await client.xrange(keys.events(request_id),
                                                     min=f"({stream_id_after(last)}", max="+"))
            return events or compacted_events(
                await client.hget(keys.record(request_id), PACKED_FIELD), last)

        pending = await backlog()
        if not pending and finished(await client.hget(keys.record(request_id), "status")):
            return
        while True:
            for event in pending:
                if event["seq"] <= last:
                    continue
                last = event["seq"]
                yield event
                if event["type"] in FINAL_EVENT_TYPES:
                    return
            message = await pubsub.get_message(timeout=_remaining(deadline))
            if message is None or message["type"] != "message":
                pending = []
                continue
            event = parse_event(message["data"])
            pending = await backlog() if event["seq"] > last + 1 else [event]
    finally:
        await pubsub.aclose()


async def tail_log(
    client: aioredis.Redis,
    settings: Settings,
    request_id: str,
    after_seq: int = 0,
    idle_s: float = 15.0,
) -> AsyncIterator[dict[str, Any] | None]:
    """Events from the replay log after `after_seq` via ``XREAD BLOCK``, until a final event.

    Yields ``None`` after every `idle_s` without an event (time for an SSE keep-alive). Ends
    without a final event only if the request is terminal or gone and its log has nothing more
    (the log expired before the record).
    """
    keys = Keys(settings.key_prefix)
    stream_key = keys.events(request_id)
    last_id = stream_id_after(after_seq)
    block_ms = max(1, int(idle_s * 1000))
    first = True
    while True:
        # The first read does not block: a request that is over and has nothing after
        # `after_seq` ends at once instead of after one idle period.
        reply: Any = await client.xread({stream_key: last_id}, count=500,
                                        block=None if first else block_ms)
        if not reply:
            if finished(await client.hget(keys.record(request_id), "status")):
                tail = await client.xrange(stream_key, min=f"({last_id}", max="+")
                if not tail:  # compacted (hybrid_router.router.core.replay), or nothing more
                    for event in compacted_events(
                            await client.hget(keys.record(request_id), PACKED_FIELD),
                            seq_of_stream_id(last_id)):
                        yield event
                    return
                continue
            if not first:
                yield None
            first = False
            continue
        first = False
        for _key, entries in reply:
            for entry_id, fields in entries:
                last_id = f"0-{seq_of_stream_id(entry_id)}"
                event = parse_event(event_data(fields))
                yield event
                if event["type"] in FINAL_EVENT_TYPES:
                    return
