"""One pub/sub connection per API process that carries the live events of every followed request.

Why: a follower on a connection of its own (or polling the replay log with ``XREAD BLOCK``)
costs Redis and the API a command, a reply and a wake-up per relayed token per stream. Here all
followers of a process share one subscribed connection: Redis pushes each event once, events
that arrive together are read in one go and handed to their followers, and a token costs no
command at all.

Each follower runs the one follow protocol (`hybrid_router.router.core.subscribe.follow`: subscribe,
read the log after the last seq, then live events, gaps and losses filled from the log) with a
`_HubSubscription` as its live source. A follower that falls behind (more than `MAX_BUFFERED`
events waiting) or a lost hub connection drops what is buffered and marks the follower `lost`:
it subscribes again and reads the log after its last seq. If Redis cannot be reached, `follow`
raises `redis.ConnectionError`.

Every Redis URL is served here (TCP, TLS, unix sockets: `hybrid_router.router.core.redis_io`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol, cast

import hiredis
import redis

from hybrid_router.router.core.events import stream_id_after
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import PACKED_FIELD
from hybrid_router.router.core.redis_io import (
    PipePool,
    check_setup_reply,
    open_transport,
    raise_errors,
    redis_target,
)
from hybrid_router.router.core.subscribe import follow
from hybrid_router.settings import Settings

log = get_logger(__name__)

# Events buffered for one follower before it is made to catch up from the log instead (a
# client that reads slower than its stream is produced must not grow the API's memory).
MAX_BUFFERED = 2048
CONNECT_TIMEOUT_S = 5.0


class EventFollower(Protocol):
    """How the API follows a request's events (`hybrid_router.router.core.subscribe.follow`)."""

    def follow(self, request_id: str, after_seq: int, idle_s: float
               ) -> AsyncIterator[dict[str, Any] | None]: ...

    async def aclose(self) -> None: ...


def event_follower(settings: Settings) -> EventFollower:
    """The hub, riding out a Redis outage of up to `Settings.stream_redis_grace_s`."""
    return OutageTolerantFollower(EventHub(settings), settings.stream_redis_grace_s)


class OutageTolerantFollower:
    """A follower whose followers outlive a Redis restart: while Redis cannot be reached it
    yields keep-alive ticks (None) and tries again, then goes on from the last seq it gave out,
    so an SSE client sees one unbroken sequence. After `grace_s` without Redis it gives up
    (raises), and the client reconnects with ``Last-Event-ID`` as after any drop."""

    RETRY_S = 0.5

    def __init__(self, inner: EventFollower, grace_s: float) -> None:
        self.inner = inner
        self.grace_s = grace_s

    async def follow(self, request_id: str, after_seq: int, idle_s: float
                     ) -> AsyncIterator[dict[str, Any] | None]:
        last = after_seq
        outage_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                async for event in self.inner.follow(request_id, last, idle_s):
                    if event is not None:
                        outage_since = None
                        last = int(event["seq"])
                    yield event
                return
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                now = loop.time()
                outage_since = outage_since if outage_since is not None else now
                if now - outage_since > self.grace_s:
                    raise
                log.warning("following events: Redis unreachable; trying again",
                            request_id=request_id, error=str(exc))
                yield None
                await asyncio.sleep(self.RETRY_S)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _HubSubscription:
    """One follower's `Subscription` on the hub: its live events not yet taken, and a way to
    wait for the next ones."""

    __slots__ = ("_waiter", "hub", "items", "lost", "name", "request_id")

    def __init__(self, hub: EventHub, request_id: str) -> None:
        self.hub = hub
        self.request_id = request_id
        self.name = hub.keys.channel(request_id).encode()
        self.items: list[bytes] = []
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes) -> None:
        if len(self.items) >= MAX_BUFFERED:
            self.mark_lost()
            return
        self.items.append(data)
        self._wake()

    def mark_lost(self) -> None:
        self.items.clear()
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    async def take(self, timeout_s: float) -> list[bytes] | None:
        if not self.items and not self.lost:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self.items and not self.lost:
                return None
        items, self.items = self.items, []
        return items

    async def subscribe(self) -> None:
        await self.hub._subscribe(self.name, self)

    async def log_and_status(self, after_seq: int) -> tuple[list[Any], Any]:
        keys = self.hub.keys
        entries, status = await self._read(
            ("XRANGE", keys.events(self.request_id), f"({stream_id_after(after_seq)}", "+"),
            ("HGET", keys.record(self.request_id), "status"))
        return entries, status

    async def packed(self) -> Any:
        (packed,) = await self._read(("HGET", self.hub.keys.record(self.request_id),
                                      PACKED_FIELD))
        return packed

    async def _read(self, *commands: tuple[Any, ...]) -> list[Any]:
        return raise_errors(await self.hub.pool.execute(list(commands)))

    async def close(self) -> None:
        self.hub._unsubscribe(self.name, self)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _HubProtocol(asyncio.Protocol):
    """The hub's connection: parses what Redis pushes and hands it to the hub."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        self.parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but has its interface.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        hub = self.hub
        while True:
            reply = self.parser.gets()
            if reply is False:
                return
            hub._on_reply(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub._on_lost(self, exc)


class _Channel:
    """The inboxes following one channel, and the confirmation of its SUBSCRIBE."""

    __slots__ = ("inboxes", "ready")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.inboxes: set[_HubSubscription] = set()
        self.ready = ready


class EventHub:
    """Live events of all of this process's followers over one subscribed Redis connection."""

    def __init__(self, settings: Settings) -> None:
        self.target = redis_target(settings.redis_url)
        self.keys = Keys(settings.key_prefix)
        self.pool = PipePool(settings.redis_url)
        self._protocol: _HubProtocol | None = None
        self._connecting: asyncio.Future[_HubProtocol] | None = None
        self._channels: dict[bytes, _Channel] = {}
        # Per channel, one future per SUBSCRIBE sent and not yet confirmed, in the order sent
        # (a channel dropped and followed again has two; each reply confirms the oldest).
        self._confirmations: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._auth_replies: deque[asyncio.Future[Any]] = deque()
        self._closed = False

    # -- the connection -------------------------------------------------------------------

    async def _connection(self) -> _HubProtocol:
        if self._protocol is not None:
            return self._protocol
        if self._closed:
            raise redis.ConnectionError("the event hub is closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        # Shielded: one follower cancelled (its client left) must not cancel the others' connect.
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _HubProtocol:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await asyncio.wait_for(
                open_transport(self.target, lambda: _HubProtocol(self)), CONNECT_TIMEOUT_S)
            for command in self.target.setup_commands(select=False):  # pub/sub has no db
                auth: asyncio.Future[Any] = loop.create_future()
                self._auth_replies.append(auth)
                self._write(protocol, command)
                reply = await asyncio.wait_for(auth, CONNECT_TIMEOUT_S)
                try:
                    check_setup_reply(reply)
                except redis.RedisError:
                    transport.close()
                    raise
        except (OSError, TimeoutError) as exc:
            raise redis.ConnectionError(f"event hub: cannot reach Redis: {exc}") from exc
        self._protocol = protocol
        return protocol

    @staticmethod
    def _write(protocol: _HubProtocol, command: tuple[Any, ...]) -> None:
        if protocol.transport is None or protocol.transport.is_closing():
            raise redis.ConnectionError("event hub: connection closed")
        protocol.transport.write(hiredis.pack_command(command))

    def _on_reply(self, protocol: _HubProtocol, reply: Any) -> None:
        if self._auth_replies and not (isinstance(reply, list) and reply
                                       and reply[0] in (b"message", b"subscribe",
                                                        b"unsubscribe")):
            waiter = self._auth_replies.popleft()  # a setup reply (AUTH; ROLE behind Sentinel)
            if not waiter.done():
                waiter.set_result(reply)
            return
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"message":
                channel = self._channels.get(reply[1])
                if channel is not None:
                    for inbox in channel.inboxes:
                        inbox.push(reply[2])
            elif kind == b"subscribe":
                waiting = self._confirmations.get(reply[1])
                if waiting:
                    _resolve(waiting.popleft())
                    if not waiting:
                        del self._confirmations[reply[1]]
            return  # unsubscribe confirmations need nothing

    def _on_lost(self, protocol: _HubProtocol, exc: Exception | None) -> None:
        if self._protocol is protocol:
            self._protocol = None
        error = redis.ConnectionError(f"event hub: connection lost: {exc or 'closed'}")
        waiters = [*self._auth_replies, *(w for q in self._confirmations.values() for w in q)]
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: nobody may be waiting on it any more
        self._auth_replies.clear()
        self._confirmations.clear()
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            for inbox in channel.inboxes:
                inbox.mark_lost()  # each follower subscribes again and reads the log
        if channels and not self._closed:
            log.warning("event hub lost its Redis connection; followers catch up from the log",
                        followers=sum(len(c.inboxes) for c in channels.values()))

    # -- subscriptions --------------------------------------------------------------------

    async def _subscribe(self, name: bytes, inbox: _HubSubscription) -> None:
        """Register `inbox` for channel `name`; return once the subscription is in effect."""
        protocol = await self._connection()
        channel = self._channels.get(name)
        if channel is None:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._write(protocol, ("SUBSCRIBE", name))
            self._confirmations.setdefault(name, deque()).append(ready)
            channel = self._channels[name] = _Channel(ready)
        channel.inboxes.add(inbox)
        if not channel.ready.done():
            try:
                await asyncio.wait_for(asyncio.shield(channel.ready), CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise redis.TimeoutError("event hub: no SUBSCRIBE confirmation from Redis "
                                         f"within {CONNECT_TIMEOUT_S:g}s") from None
        channel.ready.result()  # raises if the connection was lost before the confirmation

    def _unsubscribe(self, name: bytes, inbox: _HubSubscription) -> None:
        channel = self._channels.get(name)
        if channel is None or inbox not in channel.inboxes:
            return
        channel.inboxes.discard(inbox)
        if channel.inboxes:
            return
        del self._channels[name]
        if self._protocol is not None:
            # A gone connection took its subscriptions with it.
            with contextlib.suppress(redis.ConnectionError):
                self._write(self._protocol, ("UNSUBSCRIBE", name))

    def follow(self, request_id: str, after_seq: int, idle_s: float
               ) -> AsyncIterator[dict[str, Any] | None]:
        """`hybrid_router.router.core.subscribe.follow` with its live events from the hub."""
        return follow(_HubSubscription(self, request_id), after_seq, idle_s)

    async def aclose(self) -> None:
        self._closed = True
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self.pool.close()

