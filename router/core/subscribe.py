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
cause one) is filled from the log, and so is a subscription that was lost.

`follow` is that protocol, once, over any `Subscription`: the API's shared connection
(`hybrid_router.router.core.event_hub`) or a redis-py pub/sub of its own (`RedisPySubscription`,
sync or asyncio client). `afollow_events` / `follow_events` are it with a timeout, for Python
callers.

A slow subscriber never slows the producer: the producer's writes are plain commands, and
Redis buffers pub/sub output per subscriber (``client-output-buffer-limit pubsub``); a
subscriber that falls too far behind is disconnected by Redis — not the producer — and simply
resumes from the log with its last seq.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core.blocking import iterate_blocking
from hybrid_router.router.core.events import FINAL_EVENT_TYPES, parse_event, stream_id_after
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.records import PACKED_FIELD
from hybrid_router.router.core.replay import compacted_events
from hybrid_router.router.core.states import TERMINAL_BYTES
from hybrid_router.settings import Settings

_POLL_S = 1.0
CONFIRM_TIMEOUT_S = 5.0

Event = dict[str, Any]


class Subscription(Protocol):
    """One follower's live channel and the request's log, as `follow` uses them."""

    lost: bool  # set when live events were dropped: `follow` subscribes again, reads the log

    async def subscribe(self) -> None:
        """Subscribe to the channel; return once the subscription is in effect."""

    async def take(self, idle_s: float) -> list[Any] | None:
        """The live events (raw JSON) that arrived, at once if some are waiting; None after
        `idle_s` of nothing; [] with `lost` set when some were dropped."""

    async def log_and_status(self, after_seq: int) -> tuple[list[Any], Any]:
        """The log's entries after `after_seq` and the record's raw status."""

    async def packed(self) -> Any:
        """The record's compacted events field (`hybrid_router.router.core.replay`)."""

    async def close(self) -> None:
        """Unsubscribe."""


def event_data(fields: Any) -> Any:
    """The ``d`` field of a log entry: a dict from redis-py, a flat list from hiredis."""
    if isinstance(fields, dict):
        return fields.get(b"d") if b"d" in fields else fields.get("d")
    return dict(zip(fields[::2], fields[1::2], strict=False)).get(b"d")


def finished(status: Any) -> bool:
    """Whether a record status (raw from Redis) means no event will follow."""
    return status is None or status in TERMINAL_BYTES


async def _log_after(sub: Subscription, last: int) -> tuple[list[Event], bool]:
    """The events after seq `last` (from the log, or the compacted record), and whether the
    request is over (or gone)."""
    entries, status = await sub.log_and_status(last)
    events = [parse_event(event_data(fields)) for _entry_id, fields in entries or ()]
    over = finished(status)
    if not events and over:
        events = compacted_events(await sub.packed(), last)
    return events, over


async def follow(sub: Subscription, after_seq: int, idle_s: float
                 ) -> AsyncIterator[Event | None]:
    """Events after `after_seq`, replayed then live, until a final event; None after every
    `idle_s` without one (time for a keep-alive). Ends without a final event only when the
    request is over (or gone) and its log holds nothing more (the log expired first)."""
    last = after_seq
    try:
        await sub.subscribe()
        pending, over = await _log_after(sub, last)
        if not pending and over:
            return
        while True:
            for event in pending:
                if event["seq"] <= last:
                    continue
                last = event["seq"]
                yield event
                if event["type"] in FINAL_EVENT_TYPES:
                    return
            arrived = await sub.take(idle_s)
            if arrived is None:  # idle: over with nothing left, or time for a keep-alive
                pending, over = await _log_after(sub, last)
                if not pending:
                    if over:
                        return
                    yield None
            elif sub.lost:  # fell behind, or the connection was lost: the log has it all
                sub.lost = False
                await sub.subscribe()
                pending, _over = await _log_after(sub, last)
            else:
                pending = [parse_event(data) for data in arrived]
                if _has_gap(pending, last):
                    pending, _over = await _log_after(sub, last)
    finally:
        await sub.close()


def _has_gap(events: list[Event], last: int) -> bool:
    """Whether `events` (live, in order, maybe repeating seqs up to `last`) skip a seq."""
    for event in events:
        seq = event["seq"]
        if seq > last + 1:
            return True
        last = max(last, seq)
    return False


async def _reply(result: Any) -> Any:
    """A redis-py call's reply: awaited from the asyncio client, as it is from the sync one."""
    return await result if inspect.isawaitable(result) else result


class RedisPySubscription:
    """A `Subscription` on a pub/sub connection of its own, from a redis-py client (sync or
    asyncio; any URL redis-py takes). redis-py reconnects and subscribes again by itself; what
    was published meanwhile shows as a gap and comes from the log."""

    lost = False

    def __init__(self, client: redis.Redis | aioredis.Redis, settings: Settings,
                 request_id: str) -> None:
        keys = Keys(settings.key_prefix)
        self.client = client
        self.pubsub = client.pubsub()
        self.channel = keys.channel(request_id)
        self.events_key = keys.events(request_id)
        self.record_key = keys.record(request_id)

    async def subscribe(self) -> None:
        await _reply(self.pubsub.subscribe(self.channel))
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            message = await _reply(self.pubsub.get_message(timeout=left))
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.TimeoutError("no SUBSCRIBE confirmation from Redis "
                                 f"within {CONFIRM_TIMEOUT_S:g}s")

    async def take(self, idle_s: float) -> list[Any] | None:
        message = await _reply(self.pubsub.get_message(timeout=idle_s))
        if message is None:
            return None
        return [message["data"]] if message["type"] == "message" else []

    async def log_and_status(self, after_seq: int) -> tuple[list[Any], Any]:
        entries = await _reply(self.client.xrange(
            self.events_key, min=f"({stream_id_after(after_seq)}", max="+"))
        return entries, await _reply(self.client.hget(self.record_key, "status"))

    async def packed(self) -> Any:
        return await _reply(self.client.hget(self.record_key, PACKED_FIELD))

    async def close(self) -> None:
        closing = getattr(self.pubsub, "aclose", None) or self.pubsub.close
        await _reply(closing())


async def afollow_events(
    client: redis.Redis | aioredis.Redis,
    settings: Settings,
    request_id: str,
    after_seq: int = 0,
    timeout: float | None = None,
) -> AsyncIterator[Event]:
    """Yield the request's events after `after_seq`, live, until a final event.

    Raises `TimeoutError` when `timeout` seconds pass without reaching a final event. With the
    sync client it never suspends: `follow_events` iterates it without an event loop.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    idle_s = _POLL_S if timeout is None else min(_POLL_S, max(timeout, 0.01))
    async for event in follow(RedisPySubscription(client, settings, request_id), after_seq,
                              idle_s):
        if (deadline is not None and time.monotonic() >= deadline
                and (event is None or event["type"] not in FINAL_EVENT_TYPES)):
            raise TimeoutError("no final event before the timeout")
        if event is not None:
            yield event


def follow_events(
    client: redis.Redis,
    settings: Settings,
    request_id: str,
    after_seq: int = 0,
    timeout: float | None = None,
) -> Iterator[Event]:
    """`afollow_events` over the sync client, as a plain iterator."""
    return iterate_blocking(afollow_events(client, settings, request_id, after_seq, timeout))
