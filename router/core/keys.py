"""Every Redis key, channel and Celery queue name, built from the configured prefix.

Nobody builds a key by hand anywhere else: grep for the prefix and you find this file.
Keys that belong to one request share a ``{id}`` hash tag so they stay together on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one prefix (``Settings.key_prefix``)."""

    prefix: str

    # --- one request ---------------------------------------------------------------------------
    def record(self, request_id: str) -> str:
        """Hash: the request record (see hybrid_router.router.core.records)."""
        return f"{self.prefix}:req:{{{request_id}}}"

    def events(self, request_id: str) -> str:
        """Stream: the replay log of the request's events, entry ids ``0-<seq>``."""
        return f"{self.prefix}:ev:{{{request_id}}}"

    def seq(self, request_id: str) -> str:
        """String counter: the last event ``seq`` given out for the request."""
        return f"{self.prefix}:seq:{{{request_id}}}"

    def replay_due(self) -> str:
        """Sorted set with TTL: finished request id -> when its replay log is due for
        compaction (`core.replay`); added to by the final event's `emit()` (`core.lua`)."""
        return f"{self.prefix}:replay:due"

    def channel(self, request_id: str) -> str:
        """Pub/sub channel on which the request's events are published live."""
        return f"{self.prefix}:chan:{request_id}"

    def channel_pattern(self) -> str:
        """Pattern matching every request channel (for one shared pattern subscription)."""
        return f"{self.prefix}:chan:*"

    def lease(self, request_id: str) -> str:
        """String with TTL: held by the stream worker while it streams the request."""
        return f"{self.prefix}:lease:{{{request_id}}}"

    def cancel_flag(self, request_id: str) -> str:
        """String with TTL: set when a cancel is asked for a running request."""
        return f"{self.prefix}:cancel:{{{request_id}}}"

    def response(self, response_id: str) -> str:
        """String with TTL (`Settings.result_ttl_s`): an upstream Response id (``resp_...``)
        -> the id of the request that made it, for ``GET /v1/responses/{id}``."""
        return f"{self.prefix}:resp:{response_id}"

    def idempotency(self, tenant: str, idempotency_key: str) -> str:
        """String: tenant's idempotency key -> ``<request id> <body hash>``."""
        return f"{self.prefix}:idem:{tenant}:{idempotency_key}"

    # --- stream lane ---------------------------------------------------------------------------
    def dispatched(self) -> str:
        """Sorted set: request id -> time handed to the stream queue (for recovery sweeps)."""
        return f"{self.prefix}:stream:dispatched"

    def accounted(self, request_id: str, run_id: str) -> str:
        """String with TTL: set when one stream run's cost went into the ledger, so that an
        end repeated after an error (or a retried write) cannot count it twice."""
        return f"{self.prefix}:accounted:{{{request_id}}}:{run_id}"

    def streaming(self) -> str:
        """Sorted set: request id -> time its stream started (for dead-worker sweeps)."""
        return f"{self.prefix}:stream:running"

    def stream_engines(self) -> str:
        """Set: ids of the stream engines that may hold taken messages (`stream_taken`)."""
        return f"{self.prefix}:stream:engines"

    def stream_engine_alive(self, engine_id: str) -> str:
        """String with TTL: a stream engine's heartbeat; gone once the engine is dead."""
        return f"{self.prefix}:stream:engine:{engine_id}"

    def stream_taken(self, engine_id: str) -> str:
        """List: task messages one stream engine took off the stream queue and has not yet
        claimed; handed back to the queue when the engine's heartbeat is gone."""
        return f"{self.prefix}:stream:taken:{engine_id}"

    def stream_sweep_lock(self) -> str:
        """String lock: the one stream engine sweeping for orphaned streams right now."""
        return f"{self.prefix}:stream:sweep-lock"

    # --- batch lane ----------------------------------------------------------------------------
    def pending(self, model: str) -> str:
        """List: ids of low requests waiting for the next flush, one list per model."""
        return f"{self.prefix}:batch:pending:{model}"

    def pending_models(self) -> str:
        """Set: models that have (or recently had) a pending queue."""
        return f"{self.prefix}:batch:models"

    def claimed(self, flush_id: str) -> str:
        """List: ids claimed by one flush, kept until they are submitted or put back."""
        return f"{self.prefix}:batch:claimed:{flush_id}"

    def claim_uploads(self, claim_id: str) -> str:
        """Set: upstream file ids uploaded for one claim, noted before a batch is made of them."""
        return f"{self.prefix}:batch:claim-uploads:{claim_id}"

    def late_twin_watch(self) -> str:
        """Sorted set: uploads whose batch create failed once ([file id, kept batch id, listed
        since] as JSON), scored by when to stop watching; any other batch the upstream makes of
        such a file is cancelled (`hybrid_router.workers.batch.twins`)."""
        return f"{self.prefix}:batch:late-twin-watch"

    def claims(self) -> str:
        """Sorted set: flush id -> claim time, so a recovery step finds orphaned claims."""
        return f"{self.prefix}:batch:claims"

    def flush_lock(self) -> str:
        """String lock held by the one flush running at a time."""
        return f"{self.prefix}:batch:flush-lock"

    def poll_lock(self) -> str:
        """String lock held by the one poll running at a time."""
        return f"{self.prefix}:batch:poll-lock"

    def batch(self, batch_id: str) -> str:
        """Hash: one upstream batch (status, model, file ids, counts, flush id)."""
        return f"{self.prefix}:batch:job:{batch_id}"

    def batch_requests(self, batch_id: str) -> str:
        """Set: ids of the requests inside one upstream batch."""
        return f"{self.prefix}:batch:members:{batch_id}"

    def batches_in_flight(self) -> str:
        """Sorted set: upstream batch id -> submit time, for batches not yet finished."""
        return f"{self.prefix}:batch:inflight"

    def batch_deadlines(self) -> str:
        """Sorted set: queued low request id -> deadline, checked for escalation to stream."""
        return f"{self.prefix}:batch:deadlines"

    def callback_sent(self, request_id: str) -> str:
        """String with TTL: set once the terminal callback of a request was delivered."""
        return f"{self.prefix}:callback:{{{request_id}}}"

    def last_flush(self) -> str:
        """Hash: when the last flush ran and what it did."""
        return f"{self.prefix}:batch:last-flush"

    # --- runtime configuration, ledger, limits -------------------------------------------------
    def runtime_config(self) -> str:
        """Hash: settings changed at runtime (flush interval) that override `Settings`."""
        return f"{self.prefix}:config"

    def beat(self) -> str:
        """Hash: beat's heartbeat (`at`, its last tick) and the settings it runs with (flush
        and poll intervals), written by beat itself: what `config get`, `status`, `/v1/stats`
        and beat's health check read as the running service's values."""
        return f"{self.prefix}:beat"

    def ledger(self) -> str:
        """Hash: tokens and cost per route and model, and batch savings."""
        return f"{self.prefix}:ledger"

    def timings(self, lane: str) -> str:
        """Hash: latency histogram buckets, sums and counts of one lane (see hybrid_router.router.core.metrics)."""
        return f"{self.prefix}:metrics:timings:{lane}"

    def timings_checkpoint(self, lane: str, minute: int) -> str:
        """Hash with TTL: a copy of `timings(lane)` taken in one minute (Unix time // 60), so
        the live view tells the latencies of the last minutes (hybrid_router.router.core.live_stats)."""
        return f"{self.prefix}:metrics:timings-at:{lane}:{minute}"

    def ledger_checkpoint(self, day: str) -> str:
        """Hash with TTL: a copy of `ledger()` taken early in one UTC day (YYYY-MM-DD), so the
        live view tells the cost and savings of today (hybrid_router.router.core.live_stats)."""
        return f"{self.prefix}:ledger-at:{day}"

    def lane_latency(self) -> str:
        """Hash: ``<lane>|<model label>`` -> the lane's rolling expected latency for the model
        (seconds, `hybrid_router.router.core.lane_facts`), and ``<lane>|<model label>|n`` -> observations.
        Bounded by lanes x operator-named models."""
        return f"{self.prefix}:lanes:latency"

    def flex_unsupported(self) -> str:
        """Hash with TTL: model -> until when (epoch seconds) the upstream is taken not to
        serve it at the flex tier (it answered 400); expired fields are pruned on write."""
        return f"{self.prefix}:lanes:noflex"

    def rate(self, api_key_id: str, kind: str, window: int) -> str:
        """Counter: requests or tokens used by one key in one minute window."""
        return f"{self.prefix}:rate:{kind}:{api_key_id}:{window}"

    def batch_mode(self) -> str:
        """String: the batch mode chosen by the `auto` probe, cached."""
        return f"{self.prefix}:batch:mode"

    # --- Celery --------------------------------------------------------------------------------
    def stream_queue(self) -> str:
        """Celery queue of the stream lane."""
        return f"{self.prefix}.stream"

    def stream_control_queue(self) -> str:
        """Celery queue of the stream lane's own Celery consumer (any other task sent to the
        stream queue is forwarded there); the stream queue
        itself is consumed by the stream engine (`hybrid_router.workers.stream.engine`)."""
        return f"{self.prefix}.stream.control"

    def batch_queue(self) -> str:
        """Celery queue of the batch lane (flush, poll, emulated runs, callbacks)."""
        return f"{self.prefix}.batch"

    def celery_prefix(self) -> str:
        """Prefix Celery's own keys live under (unacked, beat, results)."""
        return f"{self.prefix}.celery."

    def celery_bindings_prefix(self) -> str:
        """Prefix of kombu's exchange bindings (one set per queue and exchange, no TTL):
        bounded by the lanes' queues, like `bounded_keys()`."""
        return f"{self.celery_prefix()}_kombu."


def bounded_keys(keys: Keys) -> list[str]:
    """Every key that may exist without a TTL once no request is in flight (besides kombu's
    bindings, `Keys.celery_bindings_prefix`). Each is bounded by the operator's configuration,
    not by traffic: the ledger by route x operator-named models (`Settings.model_label`), the
    timings by lane, the stream engines by the stream worker processes running, the rest are
    single values or hold only models with queued requests (emptied by each flush). Every other
    key either has a TTL or indexes requests in flight and is empty (so gone) when none are."""
    return [keys.ledger(), keys.timings("stream"), keys.timings("flex"), keys.timings("batch"),
            keys.lane_latency(),
            keys.runtime_config(), keys.beat(), keys.last_flush(), keys.batch_mode(),
            keys.pending_models(),
            keys.stream_engines()]
