"""Stream leases: proof that a live worker is streaming a request, kept alive by one thread.

A worker takes the lease (``SET NX PX``, key `Keys.lease`) *before* it moves the request from
``dispatched`` to ``streaming``, so every ``streaming`` request has had a lease. While the
worker lives, the keeper thread renews every lease it holds (one `RENEW_LEASES` script a
second, or every ``lease_s / 3`` if that is shorter), and takes back one that expired while
Redis was out of reach if nobody else took it. When the process dies (even by SIGKILL) the
renewals stop and the lease expires within ``Settings.stream_lease_s``: a request that is
``streaming`` without a lease has lost its worker, which is what the sweep acts on (it resumes
the stream elsewhere). A lease that another worker holds is dropped here; the stream notices
at its next publish (the publish is fenced by the lease) and stops.
"""

from __future__ import annotations

import threading
import uuid

import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.lua import RENEW_LEASES_SCRIPT, LuaScript

log = get_logger(__name__)

# Delete a lease only if this worker still holds it (KEYS[1] lease, ARGV[1] owner).
RELEASE_LEASE_SCRIPT = LuaScript(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


class LeaseKeeper:
    """Takes, refreshes and releases the leases of one worker process."""

    def __init__(self, client: redis.Redis, keys: Keys, lease_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.lease_ms = max(1, int(lease_s * 1000))
        self.owner = uuid.uuid4().hex
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stream-leases", daemon=True)
        self._thread.start()

    def acquire(self, request_id: str) -> bool:
        """Take the lease if nobody holds it (False: another worker is on this request)."""
        taken = self.redis.set(self.keys.lease(request_id), self.owner, nx=True, px=self.lease_ms)
        if taken:
            with self._lock:
                self._held.add(request_id)
        return bool(taken)

    def adopt(self, request_id: str) -> None:
        """Keep refreshing a lease this process took inside a script (see stream_claim)."""
        with self._lock:
            self._held.add(request_id)

    def release(self, request_id: str) -> None:
        with self._lock:
            held = request_id in self._held
            self._held.discard(request_id)
        if held:
            RELEASE_LEASE_SCRIPT(self.redis, [self.keys.lease(request_id)], [self.owner])

    def forget(self, request_id: str) -> None:
        """Stop refreshing a lease; the caller deletes it with `RELEASE_LEASE_SCRIPT` (the stream
        engine does so in the same round trip as the rest of a stream's clean-up)."""
        with self._lock:
            self._held.discard(request_id)

    def holds(self, request_id: str) -> bool:
        """Whether this process streams `request_id` (it holds and renews its lease)."""
        with self._lock:
            return request_id in self._held

    def alive(self, request_id: str) -> bool:
        """Whether anybody holds the request's lease."""
        return bool(self.redis.exists(self.keys.lease(request_id)))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def renew(self) -> None:
        """Renew (or take back) every lease held; drop those another worker has taken."""
        with self._lock:
            held = list(self._held)
        if not held:
            return
        results = RENEW_LEASES_SCRIPT(self.redis, [self.keys.lease(r) for r in held],
                                      [self.owner, self.lease_ms])
        lost = [r for r, ok in zip(held, results, strict=True) if not int(ok)]
        if lost:
            with self._lock:
                self._held.difference_update(lost)
            log.warning("stream leases taken over by another worker", leases=lost)

    def _loop(self) -> None:
        interval = min(1.0, self.lease_ms / 3000)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except (redis.RedisError, OSError) as exc:
                log.warning("renewing stream leases failed", error=str(exc))
