"""Accepted means durable: a new request is acknowledged once a replica has it too.

Redis replicates asynchronously, so a failover (Sentinel promoting the replica) can lose writes
the old master had already acknowledged; a request the client was told was accepted would
vanish. With replicas connected, the intake sends ``WAIT <n> <timeout>`` right after the
request's create script, on the same connection (WAIT covers that connection's writes), in the
same round trip. Without replicas nothing is sent: the replica count comes from ``INFO
replication``, read at most every `CHECK_S` seconds per process.

A replica that does not confirm within ``ROUTER_REDIS_WAIT_TIMEOUT_MS`` (gone, lagging) does
not stop the intake: the request is acknowledged anyway, a warning is logged, `ReplicaWait.
unconfirmed` counts it, and the replica count is read again before the next request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.redis_io import Executor, raise_errors
from hybrid_router.settings import Settings

log = get_logger(__name__)

CHECK_S = 5.0


def connected_replicas(info: dict[str, Any] | bytes | str) -> int:
    """Replicas of ``INFO replication`` (redis-py's dict, or the raw text) that are online
    (``connected_slaves`` counts those still syncing too)."""
    if isinstance(info, bytes | str):
        text = info.decode() if isinstance(info, bytes) else info
        return sum(1 for line in text.splitlines()
                   if line.startswith("slave") and ":ip=" in line and "state=online" in line)
    count = 0
    for name, value in info.items():
        if str(name).startswith("slave") and isinstance(value, dict):
            count += value.get("state", "online") == "online"
    return count


class ReplicaWait:
    """The ``WAIT`` a write that must be durable ends with, or None (no replica, or off)."""

    def __init__(self, settings: Settings) -> None:
        self.wanted = settings.redis_wait_replicas
        self.timeout_ms = settings.redis_wait_timeout_ms
        self.replicas = 0
        self.checked_at: float | None = None
        self.unconfirmed = 0
        self._refresh: asyncio.Task[None] | None = None

    def _command(self) -> tuple[Any, ...] | None:
        needed = min(self.wanted, self.replicas)
        return ("WAIT", needed, self.timeout_ms) if needed > 0 else None

    def _stale(self) -> bool:
        return self.checked_at is None or time.monotonic() - self.checked_at > CHECK_S

    def _learn(self, info: dict[str, Any] | bytes | str) -> None:
        replicas = connected_replicas(info)
        if replicas != self.replicas:
            log.info("redis replicas connected", replicas=replicas,
                     waiting_for=min(self.wanted, replicas))
        self.replicas = replicas
        self.checked_at = time.monotonic()

    def may_wait(self, client: Executor) -> bool:
        """Whether a durable write may need a WAIT (cheap: the count as last read, refreshed in
        the background when older than `CHECK_S`); False without replicas."""
        if self.wanted <= 0:
            return False
        if self.checked_at is None:
            return True
        if self._stale() and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.get_running_loop().create_task(self._aread(client))
        return self.replicas > 0

    async def acommand(self, client: Executor) -> tuple[Any, ...] | None:
        """The WAIT to send (the first call reads the replica count)."""
        if self.wanted <= 0:
            return None
        if self.checked_at is None:
            await self._aread(client)
        return self._command()

    async def _aread(self, client: Executor) -> None:
        try:
            (info,) = raise_errors(await client.execute([("INFO", "replication")]))
            self._learn(info)
        except (redis.RedisError, OSError) as exc:  # the write that follows will say more
            log.warning("cannot read the replica count", error=str(exc))
            self.checked_at = time.monotonic() - CHECK_S / 2  # not again at once

    def command(self, client: redis.Redis) -> tuple[Any, ...] | None:
        """`acommand` for a synchronous client (read inline when stale)."""
        if self.wanted <= 0:
            return None
        if self._stale():
            try:
                self._learn(client.info("replication"))
            except (redis.RedisError, OSError) as exc:
                log.warning("cannot read the replica count", error=str(exc))
        return self._command()

    def confirmed(self, command: tuple[Any, ...], reply: Any) -> None:
        """Check WAIT's reply (the replicas that have the writes)."""
        if isinstance(reply, int) and reply >= command[1]:
            return
        self.unconfirmed += 1
        self.checked_at = None
        log.warning("request acknowledged before a replica confirmed it",
                    replicas_confirmed=reply if isinstance(reply, int) else str(reply),
                    replicas_wanted=command[1], timeout_ms=self.timeout_ms)
