"""The request store: create, read, move and announce requests in Redis.

Each operation is built once as a `StoreOp` (which script, which keys, which arguments and how
to read the answer) and run by either the sync `RequestStore` (Celery workers, `enqueue()`) or
the async `AsyncRequestStore` (the intake API). The logic therefore exists once; the two
classes only differ in how they wait.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.coalesce import ScriptCoalescer
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lua import (
    ANNOTATE_SCRIPT,
    CANCEL_SCRIPT,
    CREATE_SCRIPT,
    EMIT_SCRIPT,
    EMIT_TOKENS_SCRIPT,
    GET_OWNED_SCRIPT,
    TRANSITION_SCRIPT,
    LuaScript,
)
from hybrid_router.router.core.records import PACKED_FIELD, STREAMED_ROUTES, RequestRecord, dumps, now
from hybrid_router.router.core.redis_io import PipePool, client_retry, raise_errors
from hybrid_router.router.core.redis_text import text, text_or_none
from hybrid_router.router.core.replay import compacted_events, replay_policy
from hybrid_router.router.core.replica_wait import ReplicaWait
from hybrid_router.router.core.states import TERMINAL
from hybrid_router.settings import Settings

T = TypeVar("T")

IDEMPOTENCY_TTL_S = 24 * 3600


def body_fingerprint(body: dict[str, Any]) -> str:
    """A stable hash of a request body, to tell a true retry from a reused idempotency key."""
    return hashlib.sha256(dumps_sorted(body).encode()).hexdigest()[:32]


def dumps_sorted(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True)
class CreateOutcome:
    """`created` is False when an idempotency key (or the id) already existed."""

    created: bool
    request_id: str
    body_fingerprint: str | None = None


@dataclass(frozen=True)
class TransitionOutcome:
    moved: bool
    previous: str | None  # None when the record does not exist


@dataclass(frozen=True)
class RunEnd:
    """A stream run's end, written by the same script as the record's last write (see
    `_END_RUN` in hybrid_router.router.core.lua): the lease back, out of the running index, the run's ledger and
    timing increments once.

    `keys`: marker, lease, running zset, then the hashes incremented. `args`: lease owner,
    request id, marker TTL, then (hash position counted from the marker, field, amount) triples.
    """

    keys: list[str]
    args: list[Any]


def _flat_fields(fields: dict[str, Any]) -> list[str]:
    """A record's fields as HSET arguments: strings as they are, the rest as JSON; None skipped."""
    flat: list[str] = []
    for name, value in fields.items():
        if value is not None:
            flat += [name, value if isinstance(value, str) else dumps(value)]
    return flat


@dataclass(frozen=True)
class StoreOp(Generic[T]):
    script: LuaScript
    keys: list[str]
    args: list[Any]
    parse: Callable[[Any], T]


class StoreOps:
    """Builds every store operation from `Settings` (shared by the sync and async stores)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Built once: every event-emitting script takes it (a stream sends one per token batch).
        self._replay_policy = replay_policy(settings)

    def _event_args(self, request_id: str) -> list[Any]:
        return [self.keys.channel(request_id), self.settings.replay_maxlen, self._replay_policy]

    def create(
        self,
        record: RequestRecord,
        events: Sequence[str],
        idempotency_fingerprint: str | None = None,
        task: tuple[str, str] | None = None,
    ) -> StoreOp[CreateOutcome]:
        """Create the record, its queue entry and events; with `task` (list key, message), also
        LPUSH the lane's task message in the same script (see hybrid_router.router.core.celery_message). A queued
        request with a deadline is indexed in `Keys.batch_deadlines` for escalation."""
        k = self.keys
        if record.route == "batch" and record.status == "queued":
            queue_kind, queue_key = "list", k.pending(record.batch_queue)
        elif record.route in STREAMED_ROUTES and record.status == "dispatched":
            queue_kind, queue_key = "zset", k.dispatched()
        else:
            queue_kind, queue_key = "", k.dispatched()
        idem_key = (
            k.idempotency(record.tenant, record.idempotency_key)
            if record.idempotency_key
            else k.idempotency(record.tenant, "-")
        )
        idem_value = (
            f"{record.id} {idempotency_fingerprint}"
            if record.idempotency_key and idempotency_fingerprint
            else ""
        )
        fields: list[str] = []
        for name, value in record.to_hash().items():
            fields += [name, value]
        args: list[Any] = [
            record.id,
            idem_value,
            IDEMPOTENCY_TTL_S,
            queue_kind,
            record.created_at,
            record.batch_queue,
            *self._event_args(record.id),
            len(events),
            *events,
            task[1] if task else "",
            record.deadline_at if queue_kind == "list" and record.deadline_at is not None else "",
            orjson.dumps(fields),
        ]
        keys = [idem_key, k.seq(record.id), k.events(record.id), queue_key, k.pending_models(),
                task[0] if task else k.dispatched(), k.batch_deadlines()]

        def parse(raw: Any) -> CreateOutcome:
            code, value = int(raw[0]), text(raw[1])
            if code == 1:
                return CreateOutcome(True, value)
            if not value:
                return CreateOutcome(False, record.id)
            existing_id, _, fingerprint = value.partition(" ")
            return CreateOutcome(False, existing_id, fingerprint or None)

        return StoreOp(CREATE_SCRIPT, [k.record(record.id), *keys], args, parse)

    def transition(
        self,
        request_id: str,
        to_status: str,
        *,
        allowed_from: Sequence[str] | None = None,
        fields: dict[str, Any] | None = None,
        event: str | None = None,
        incr_attempts: bool = False,
        run_end: RunEnd | None = None,
    ) -> StoreOp[TransitionOutcome]:
        """Move a request to `to_status` unless it is terminal (or not in `allowed_from`);
        with `run_end`, a move also ends that stream run, in the same script."""
        k = self.keys
        terminal = to_status in TERMINAL
        values = dict(fields or {})
        if terminal and "finished_at" not in values:
            values["finished_at"] = now()
        flat = _flat_fields(values)
        args: list[Any] = [
            ",".join(allowed_from) if allowed_from else "*",
            to_status,
            *self._event_args(request_id),
            self.settings.result_ttl_s if terminal else 0,
            "1" if incr_attempts else "0",
            event or "",
            len(flat),
            *flat,
            *(run_end.args if run_end else ()),
        ]

        def parse(raw: Any) -> TransitionOutcome:
            code, prev = int(raw[0]), text(raw[1])
            return TransitionOutcome(code == 1, prev or None if code != -1 else None)

        return StoreOp(
            TRANSITION_SCRIPT,
            [k.record(request_id), k.seq(request_id), k.events(request_id),
             *(run_end.keys if run_end else ())],
            args,
            parse,
        )

    def emit(self, request_id: str, events: Sequence[str], guard: bool = True) -> StoreOp[int]:
        """Append and publish events; with `guard`, refuse (-1) once the request is terminal."""
        k = self.keys
        return StoreOp(
            EMIT_SCRIPT,
            [k.seq(request_id), k.events(request_id), k.record(request_id)],
            [*self._event_args(request_id), "1" if guard else "0", *events],
            lambda raw: int(raw),
        )

    def emit_tokens(self, request_id: str, owner: str, relayed_before: int, tokens: int,
                    events: Sequence[str]) -> StoreOp[int]:
        """Append and publish what a stream produced (`tokens` parts: texts or tool-call
        chunks, as `events`), fenced by its lease and idempotent by its relayed count (see
        EMIT_TOKENS): the last seq, 0 for a repeat, -1 once terminal, -2 when another worker
        owns the stream."""
        k = self.keys
        return StoreOp(
            EMIT_TOKENS_SCRIPT,
            [k.seq(request_id), k.events(request_id), k.record(request_id), k.lease(request_id)],
            [*self._event_args(request_id), owner, relayed_before, tokens, *events],
            lambda raw: int(raw),
        )

    def get_owned(self, request_id: str, tenant: str) -> StoreOp[RequestRecord | None]:
        """The record if `tenant` owns it, else None (unknown and foreign ids alike)."""
        return StoreOp(GET_OWNED_SCRIPT, [self.keys.record(request_id)], [tenant],
                       _record_from_flat)

    def cancel(self, request_id: str, queue: str) -> StoreOp[tuple[str, str]]:
        """Cancel the request; `queue`: its batch queue (`RequestRecord.batch_queue`), which a
        queued request leaves."""
        k = self.keys
        return StoreOp(
            CANCEL_SCRIPT,
            [
                k.record(request_id),
                k.seq(request_id),
                k.events(request_id),
                k.pending(queue),
                k.dispatched(),
                k.cancel_flag(request_id),
                k.batch_deadlines(),
            ],
            [
                *self._event_args(request_id),
                self.settings.result_ttl_s,
                now(),
                ev.cancelled(),
                max(60, int(self.settings.stream_total_timeout_s)),
            ],
            lambda raw: (text(raw[0]), text(raw[1])),
        )

    def annotate(self, request_id: str, fields: dict[str, Any],
                 run_end: RunEnd | None = None) -> StoreOp[bool]:
        """Set fields on an existing record without touching its status (False if it is gone);
        with `run_end`, also end that stream run in the same script (whether or not it is).

        For facts learnt after a request became terminal, e.g. the tokens a cancelled stream
        had already paid for.
        """
        flat = _flat_fields(fields)
        return StoreOp(
            ANNOTATE_SCRIPT,
            [self.keys.record(request_id), *(run_end.keys if run_end else ())],
            [len(flat), *flat, *(run_end.args if run_end else ())],
            lambda raw: int(raw) == 1,
        )


def _record_or_none(raw: dict[Any, Any]) -> RequestRecord | None:
    return RequestRecord.from_hash(raw) if raw else None


def _record_from_flat(raw: Any) -> RequestRecord | None:
    """A record from a script's flat HGETALL reply (None for nil or empty)."""
    if not raw:
        return None
    return RequestRecord.from_hash(dict(zip(raw[::2], raw[1::2], strict=True)))


def _events_from_xrange(entries: list[Any]) -> list[dict[str, Any]]:
    out = []
    for _entry_id, fields in entries:
        data = fields.get(b"d") if b"d" in fields else fields.get("d")
        out.append(ev.parse_event(data))
    return out


class RequestStore:
    """Synchronous store, for Celery workers and the direct `enqueue()` client."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.ops = StoreOps(settings)
        self.keys = self.ops.keys
        self.replicas = ReplicaWait(settings)

    def run(self, op: StoreOp[T]) -> T:
        return op.parse(op.script(self.redis, op.keys, op.args))

    def create(
        self, record: RequestRecord, events: Sequence[str], fingerprint: str | None = None,
        task: tuple[str, str] | None = None,
    ) -> CreateOutcome:
        op = self.ops.create(record, events, fingerprint, task)
        wait = self.replicas.command(self.redis)
        if wait is None:
            return self.run(op)
        # Durable before acknowledged (`core.replica_wait`): the WAIT on the create's connection.
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
            pipe.wait(wait[1], wait[2])
            result, acked = pipe.execute(raise_on_error=False)
            if isinstance(result, redis.exceptions.NoScriptError) and attempt == 1:
                self.redis.script_load(op.script.source)
                continue
            break
        if isinstance(result, Exception):
            raise result
        self.replicas.confirmed(wait, acked)
        return op.parse(result)

    def get(self, request_id: str) -> RequestRecord | None:
        return _record_or_none(self.redis.hgetall(self.keys.record(request_id)))

    def transition(self, request_id: str, to_status: str, **kw: Any) -> TransitionOutcome:
        return self.run(self.ops.transition(request_id, to_status, **kw))

    def emit(self, request_id: str, events: Sequence[str], guard: bool = True) -> int:
        return self.run(self.ops.emit(request_id, events, guard))

    def cancel(self, request_id: str, queue: str) -> tuple[str, str]:
        return self.run(self.ops.cancel(request_id, queue))

    def annotate(self, request_id: str, fields: dict[str, Any],
                 run_end: RunEnd | None = None) -> bool:
        return self.run(self.ops.annotate(request_id, fields, run_end))

    def events_after(self, request_id: str, seq: int = 0, count: int | None = None) -> list[dict[str, Any]]:
        entries = self.redis.xrange(
            self.keys.events(request_id), min=f"({ev.stream_id_after(seq)}", max="+", count=count
        )
        return _events_from_xrange(entries or []) or compacted_events(
            self.redis.hget(self.keys.record(request_id), PACKED_FIELD), seq)


class AsyncRequestStore:
    """Asynchronous store, for the intake API."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.ops = StoreOps(settings)
        self.keys = self.ops.keys
        # Raw hiredis connections for the scripts (see hybrid_router.router.core.coalesce).
        self.pool = PipePool(settings.redis_url, retry=client_retry())
        self.scripts = ScriptCoalescer(self.pool, ReplicaWait(settings))

    async def run(self, op: StoreOp[T], durable: bool = False) -> T:
        return op.parse(await self.scripts.run(op.script, op.keys, op.args, durable))

    def close(self) -> None:
        """Close the idle raw connections (the redis-py client is its owner's to close)."""
        self.pool.close()

    async def create(
        self, record: RequestRecord, events: Sequence[str], fingerprint: str | None = None,
        task: tuple[str, str] | None = None,
    ) -> CreateOutcome:
        # Durable: acknowledged once a replica has it too, where there is one (replica_wait).
        return await self.run(self.ops.create(record, events, fingerprint, task), durable=True)

    async def get(self, request_id: str) -> RequestRecord | None:
        return _record_or_none(await self.redis.hgetall(self.keys.record(request_id)))

    async def get_owned(self, request_id: str, tenant: str) -> RequestRecord | None:
        """The record when `tenant` owns it, else None, in one script: the owner is read first
        and the record only for its owner, so a foreign id costs what an unknown one does."""
        return await self.run(self.ops.get_owned(request_id, tenant))

    async def tenant_of(self, request_id: str) -> str | None:
        """The request's tenant, None when there is no such request: one field, for a route
        that checks ownership and needs nothing else of the record (the whole record is read
        and validated otherwise, on every follow of a stream)."""
        (raw,) = raise_errors(await self.pool.execute([("HGET", self.keys.record(request_id),
                                                         "tenant")]))
        return text_or_none(raw)

    async def transition(self, request_id: str, to_status: str, **kw: Any) -> TransitionOutcome:
        return await self.run(self.ops.transition(request_id, to_status, **kw))

    async def emit(self, request_id: str, events: Sequence[str], guard: bool = True) -> int:
        return await self.run(self.ops.emit(request_id, events, guard))

    async def cancel(self, request_id: str, queue: str) -> tuple[str, str]:
        return await self.run(self.ops.cancel(request_id, queue))

    async def annotate(self, request_id: str, fields: dict[str, Any],
                       run_end: RunEnd | None = None) -> bool:
        return await self.run(self.ops.annotate(request_id, fields, run_end))

    async def events_after(
        self, request_id: str, seq: int = 0, count: int | None = None
    ) -> list[dict[str, Any]]:
        entries = await self.redis.xrange(
            self.keys.events(request_id), min=f"({ev.stream_id_after(seq)}", max="+", count=count
        )
        return _events_from_xrange(entries or []) or compacted_events(
            await self.redis.hget(self.keys.record(request_id), PACKED_FIELD), seq)
