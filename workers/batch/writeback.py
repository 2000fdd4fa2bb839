"""Writing batch results back to their requests, exactly once each.

Results go in chunks of `WRITE_CHUNK` through one script call (`FINISH_MANY`) that moves each
request to its terminal state *and* adds the cost of exactly the requests it moved to the ledger,
only for requests still `submitted`; a line seen twice (a poll that runs twice, a retried task)
changes nothing and is counted once. A request that got no usable line goes back to its queue
(`REQUEUE`) or fails after its attempts. Each request that this writer moved to a terminal state
adds its latencies to the batch lane's histograms once (`LatencyTally`, written after the move:
a duplicate line moves nothing and so observes nothing; a process killed between the move and
the write loses those observations, never doubles them).

Why it is built this way: 50,000 results must be written in under 3 s. One script per request
spent most of that on per-call overhead in Redis, pricing each line with `Decimal` twice cost
as much again (`BatchPricer` gives the same figures from integer pico-dollars), and Redis and
this process took turns; now one chunk runs in Redis while the next is parsed here
(`hybrid_router.workers.batch.lua.run_overlapped`). The output file is streamed: at most two chunks of parsed
lines are held at a time.
"""

from __future__ import annotations

import gc
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, NamedTuple

import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.endpoints import CHAT, batch_queue, result_from_body
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import ledger_increments
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.metrics import BUCKETS, timing_increments
from hybrid_router.router.core.pricing import lane_multiplier
from hybrid_router.router.core.records import RequestRecord, dumps, dumps_bytes, now
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.router.core.states import Status
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lua import (
    FINISH_MANY_SCRIPT,
    REQUEUE_SCRIPT,
    ScriptCall,
    run_overlapped,
    run_pipelined,
)
from hybrid_router.workers.retry import RETRYABLE_STATUS

log = get_logger(__name__)

WRITE_CHUNK = 500
# Chunks in flight at once: Redis always has the next chunk queued while this thread parses,
# so neither waits on the other when a chunk takes one of them longer than usual.
WRITE_DEPTH = 3
# Latencies of moved requests are written every this many chunks (and at the end of a write):
# each write waits behind the chunks queued in Redis, so not often.
LATENCY_WRITE_EVERY = 40
# FINISH_MANY's answer for a request cancelled after it was submitted whose line ran anyway: its
# cost is on the cancelled record and in the ledger (see `hybrid_router.workers.batch.lua.FINISH_MANY`).
PAID_AFTER_CANCEL = 2
# Per-line error codes the Batch API uses for lines it never ran: always worth another batch.
SKIPPED_LINE_CODES = frozenset({"batch_expired", "batch_cancelled", "batch_failed"})

Notify = Callable[[str], None]


def no_notify(_request_id: str) -> None:
    """A `Notify` that does nothing (requests without callbacks, unit tests)."""


class LineOutcome(NamedTuple):
    """What one output/error line (or one emulated call) says about one request.

    A tuple, not a dataclass: a write-back makes 50,000 of them."""

    request_id: str
    ok: bool
    result: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    error_code: str = ""
    error_message: str = ""
    retryable: bool = False


@dataclass
class WritebackReport:
    completed: int = 0
    failed: int = 0
    requeued: int = 0
    unchanged: int = 0
    # Cancelled after they were submitted, yet their lines ran and were billed: cost recorded.
    paid_after_cancel: int = 0
    seen: set[str] = field(default_factory=set)

    def add(self, other: WritebackReport) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.requeued += other.requeued
        self.unchanged += other.unchanged
        self.paid_after_cancel += other.paid_after_cancel
        self.seen |= other.seen


def parse_line(obj: dict[str, Any]) -> LineOutcome | None:
    """One line of a batch output or error file (None when it names no request)."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None
    response = obj.get("response") or None
    error = obj.get("error") or None
    status = int(response.get("status_code") or 0) if isinstance(response, dict) else 0
    if status == 200 and isinstance(response, dict) and isinstance(response.get("body"), dict):
        result, usage = result_from_body(response["body"])
        return LineOutcome(custom_id, True, result, usage)
    if isinstance(response, dict) and status:
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        err = (body or {}).get("error") or {}
        return LineOutcome(
            custom_id, False,
            error_code=str(err.get("code") or err.get("type") or f"upstream_{status}"),
            error_message=str(err.get("message") or f"upstream answered {status}"),
            retryable=status in RETRYABLE_STATUS,
        )
    err = error if isinstance(error, dict) else {}
    code = str(err.get("code") or "batch_line_error")
    return LineOutcome(
        custom_id, False, error_code=code,
        error_message=str(err.get("message") or "the batch returned no response for this line"),
        retryable=code in SKIPPED_LINE_CODES or not err,
    )


# Above this many pico-dollars a result is priced by `ledger_increments` itself (Decimal), so
# the integer path never has to reason about Decimal's 28-digit context. (10**15 pico = $1000.)
_FAST_PRICE_LIMIT = 10**15


class BatchPricer:
    """Cost and ledger amounts of one batch's results, equal to `ledger_increments` bit for bit.

    `hybrid_router.router.core.pricing.cost_usd` is exact to the pico-dollar and rounds half-even; with prices of at
    most six decimals per million tokens the standard cost is a whole number of pico-dollars, so
    the same answer comes from integer arithmetic: standard = tokens x pico-per-token, paid =
    standard x discount rounded half-even. Prices or sizes outside that fall back to
    `ledger_increments` itself.
    """

    def __init__(self, settings: Settings, model: str, *, emulated: bool = False) -> None:
        self.settings, self.model, self.emulated = settings, model, emulated
        self.names: list[str] = list(
            ledger_increments(settings, "batch", model, None, emulated=emulated)[1])
        price = settings.price_for(model)
        per_token_in = price.input_per_mtok * 1_000_000
        per_token_out = price.output_per_mtok * 1_000_000
        multiplier = lane_multiplier(settings, "batch", emulated=emulated)
        self._fast = (per_token_in == per_token_in.to_integral_value()
                      and per_token_out == per_token_out.to_integral_value()
                      and multiplier >= 0)
        self._in, self._out = int(per_token_in), int(per_token_out)
        self._num, self._den = multiplier.as_integer_ratio()

    def price(self, usage: dict[str, Any] | None) -> tuple[Decimal, list[int]]:
        """`(cost, amounts)`, amounts in the order of `names`, as `ledger_increments` gives."""
        if not usage:
            return Decimal(0), [1, 0, 0, 0, 0]
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if self._fast and prompt >= 0 and completion >= 0:
            standard = prompt * self._in + completion * self._out
            if standard < _FAST_PRICE_LIMIT:
                paid, rest = divmod(standard * self._num, self._den)
                if 2 * rest > self._den or (2 * rest == self._den and paid & 1):
                    paid += 1
                return Decimal(paid).scaleb(-12), [1, prompt, completion, paid, standard]
        cost, increments = ledger_increments(self.settings, "batch", self.model, usage,
                                             emulated=self.emulated)
        return cost, [increments[name] for name in self.names]


class LatencyTally:
    """Latencies of the requests a writer moved to a terminal state, summed for one HINCRBY each.

    The fields and their meaning are `hybrid_router.router.core.metrics.timing_increments`'s, so the batch lane's
    histograms mean exactly what the stream lane's do. Calling it for each of 50,000 requests
    cost a fifth of the write-back, so it is called once per (status, bucket) to learn which
    fields an observation there adds; per request only the bucket (`bisect` over
    `hybrid_router.router.core.metrics.BUCKETS`, as `timing_increments` picks it) and the microseconds are taken.
    On the batch lane every metric of a request observes the same duration (time to first
    content is the finish time there).
    """

    def __init__(self) -> None:
        self._record = RequestRecord.model_construct(
            id="", tenant="", priority="low", route="batch", status="completed", model="",
            created_at=0.0)
        self._fields: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
        # Per (status, bucket): how many observations and their summed microseconds.
        self._counts: dict[tuple[str, int], int] = {}
        self._micros: dict[tuple[str, int], int] = {}

    def _fields_for(self, status: Status, seconds: float) -> tuple[list[str], list[str]]:
        """`(counted, summed)`: fields `timing_increments` adds 1 to, and the sum fields."""
        self._record.__dict__.update(status=status, created_at=0.0, finished_at=seconds)
        names = timing_increments(self._record)
        summed = [name for name in names if name.endswith("|sum_us")]
        return [name for name in names if name not in summed], summed

    def observe(self, status: Status, created_at: float, finished_at: float) -> None:
        seconds = max(finished_at - created_at, 0.0)
        key = (status, bisect_left(BUCKETS, seconds))
        if key not in self._fields:
            self._fields[key] = self._fields_for(status, seconds)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._micros[key] = self._micros.get(key, 0) + int(seconds * 1_000_000)

    def observe_raw(self, status: Status, created_raw: Any, finished_at: float) -> None:
        """`observe` with created_at as Redis returned it ('' / None when the record had none)."""
        if created_raw:
            try:
                self.observe(status, float(created_raw), finished_at)
            except ValueError:
                log.warning("unreadable created_at; latency not recorded")

    @property
    def increments(self) -> dict[str, int]:
        """The HINCRBY amounts of everything observed since the last write, by field."""
        out: dict[str, int] = {}
        for key, count in self._counts.items():
            counted, summed = self._fields[key]
            for name in counted:
                out[name] = out.get(name, 0) + count
            for name in summed:
                out[name] = out.get(name, 0) + self._micros[key]
        return out

    def write(self, client: redis.Redis, keys: Keys) -> None:
        increments = self.increments
        if not increments:
            return
        pipe = client.pipeline(transaction=False)
        for name, amount in increments.items():
            pipe.hincrby(keys.timings("batch"), name, amount)
        pipe.execute()
        self._counts, self._micros = {}, {}


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one write-back (and resume it after).

    A write-back allocates a dozen containers per result line, which runs the collector
    hundreds of times over a 50,000-line file: a fifth of the write-back's CPU, for nothing, as
    those objects hold no cycles and are freed by reference counting as each chunk is settled.
    Nesting and a collector already paused by the caller are respected.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class _Chunk:
    """One chunk of outcomes, split into final ones (FINISH_MANY) and retryable ones."""

    outcomes: list[LineOutcome]
    finals: list[LineOutcome]
    retries: list[LineOutcome]
    finished: float


def _chunks(outcomes: Iterable[LineOutcome], size: int) -> Iterator[list[LineOutcome]]:
    buffer: list[LineOutcome] = []
    for out in outcomes:
        buffer.append(out)
        if len(buffer) >= size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


class BatchWriter:
    """Writes outcomes of one batch (id, model, mode) to its requests."""

    def __init__(self, client: redis.Redis, settings: Settings, batch_id: str, model: str,
                 *, emulated: bool = False, notify: Notify = no_notify,
                 endpoint: str = CHAT) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.batch_id = batch_id
        self.model = model
        self.endpoint = endpoint
        self.queue = batch_queue(endpoint, model)  # where a request of this batch waits
        self.emulated = emulated
        self.notify = notify
        self.pricer = BatchPricer(settings, model, emulated=emulated)

    # --- building one script call ----------------------------------------------------------
    def _finish_args(self, out: LineOutcome) -> list[Any]:
        """One request's part of a FINISH_MANY call (see `hybrid_router.workers.batch.lua.FINISH_MANY`)."""
        channel = self.keys.channel(out.request_id)
        if out.ok:
            cost, amounts = self.pricer.price(out.usage)
            result = out.result or {}
            content = str(result.get("content") or "")
            event = ev.done(result.get("finish_reason"), out.usage, cost, len(content))
            return ["completed", channel, event, *amounts, dumps_bytes(result), str(cost),
                    dumps_bytes(out.usage) if out.usage else ""]
        error = {"code": out.error_code, "message": out.error_message, "retryable": False}
        return ["failed", channel, ev.error(out.error_code, out.error_message, False),
                dumps(error)]

    def _finish_call(self, finals: Sequence[LineOutcome], finished: float
                     ) -> tuple[list[str], list[Any]]:
        """Keys and args of one FINISH_MANY call over `finals` (built in the caller's thread)."""
        k, s = self.keys, self.settings
        keys = [k.ledger()]
        args: list[Any] = ["submitted", s.replay_maxlen, replay_policy(s), s.result_ttl_s,
                           repr(finished), self.batch_id, len(self.pricer.names),
                           *self.pricer.names]
        for out in finals:
            rid = out.request_id
            keys += [k.record(rid), k.seq(rid), k.events(rid)]
            args += self._finish_args(out)
        return keys, args

    def _requeue_call(self, request_id: str, code: str, message: str, finished: float,
                      group: str = "", charged: bool = True) -> tuple[list[str], list[Any]]:
        k = self.keys
        error = {"code": code, "message": message, "retryable": False}
        reason = f"{code}: {message}" if charged else (
            f"batch {self.batch_id} failed as a whole ({code}: {message}); sent again in a "
            "smaller batch to find the request at fault, no attempt used")
        return (
            [k.record(request_id), k.seq(request_id), k.events(request_id),
             k.pending(self.queue), k.pending_models(), k.batch_deadlines()],
            [self.batch_id, self.settings.batch_max_attempts, k.channel(request_id),
             self.settings.replay_maxlen, replay_policy(self.settings),
             self.settings.result_ttl_s, repr(finished),
             ev.queued(None, reason[:300]),
             ev.error(code, f"{message} (gave up after {self.settings.batch_max_attempts} "
                      "attempts)", False),
             dumps(error), request_id, self.queue, 1 if charged else 0, group],
        )

    # --- writing ---------------------------------------------------------------------------
    def write(self, outcomes: Iterable[LineOutcome], chunk: int = WRITE_CHUNK) -> WritebackReport:
        """Apply outcomes: results and final errors finish, retryable errors requeue.

        Outcomes are consumed lazily, `chunk` at a time, so a 50,000-line file is never held
        parsed in memory at once (two chunks at most). While Redis runs one chunk's script,
        this thread parses and prices the next (`run_overlapped`); each chunk is then settled
        (counts, latencies, callbacks, requeues) in order.
        """
        with collector_paused():
            return self._write(outcomes, chunk)

    def _write(self, outcomes: Iterable[LineOutcome], chunk: int) -> WritebackReport:
        report = WritebackReport()
        tally = LatencyTally()
        prepared = (self._prepare_chunk(part) for part in _chunks(outcomes, chunk))
        try:
            for n, (part, flat) in enumerate(
                    run_overlapped(self.client, FINISH_MANY_SCRIPT, prepared, WRITE_DEPTH), 1):
                report.add(self._settle_chunk(part, flat, tally))
                if n % LATENCY_WRITE_EVERY == 0:
                    # Waits for the chunk now running in Redis, hence not after every chunk.
                    tally.write(self.client, self.keys)
        except BaseException:
            # A later chunk failed, but the requests of the settled ones did move.
            try:
                tally.write(self.client, self.keys)
            except redis.RedisError as exc:
                log.warning("batch latencies not recorded", batch_id=self.batch_id,
                            error=str(exc)[:300])
            raise
        tally.write(self.client, self.keys)
        return report

    def _prepare_chunk(self, outcomes: list[LineOutcome]) -> tuple[_Chunk, ScriptCall | None]:
        finals = [o for o in outcomes if o.ok or not o.retryable]
        retries = [o for o in outcomes if not o.ok and o.retryable]
        finished = now()
        call = self._finish_call(finals, finished) if finals else None
        return _Chunk(outcomes, finals, retries, finished), call

    def _settle_chunk(self, part: _Chunk, flat: list[Any] | None,
                      tally: LatencyTally) -> WritebackReport:
        """Count what a chunk's FINISH_MANY did; latencies, callbacks and requeues follow it."""
        report = WritebackReport(seen={o.request_id for o in part.outcomes})
        answers = flat or []
        responses: dict[str, str] = {}
        for i, out in enumerate(part.finals):
            moved, callback_url, created = answers[3 * i:3 * i + 3]
            if int(moved) == PAID_AFTER_CANCEL:
                report.paid_after_cancel += 1
                continue
            if int(moved) != 1:
                report.unchanged += 1
                continue
            if out.ok:
                report.completed += 1
                response_id = _response_id(out.result)
                if response_id:
                    responses[response_id] = out.request_id
            else:
                report.failed += 1
            tally.observe_raw("completed" if out.ok else "failed", created, part.finished)
            if callback_url:
                self.notify(out.request_id)
        if responses:
            remember_responses(self.client, self.settings, responses)
        report.requeued, failed = self._requeue(
            [(o.request_id, o.error_code, o.error_message) for o in part.retries], report, tally)
        report.failed += failed
        return report

    def requeue(self, items: Sequence[tuple[str, str, str]],
                groups: Mapping[str, str] | None = None, *, charged: bool = True
                ) -> WritebackReport:
        """Send `(request_id, code, message)` back to the queue (or fail them when exhausted).

        `groups` (request id -> group) marks requests the next flush batches by group;
        `charged=False` puts them back without using one of their attempts (a batch split)."""
        report = WritebackReport(seen={i[0] for i in items})
        requeued, failed = 0, 0
        for start in range(0, len(items), WRITE_CHUNK):
            tally = LatencyTally()
            r, f = self._requeue(items[start:start + WRITE_CHUNK], report, tally, groups or {},
                                 charged)
            tally.write(self.client, self.keys)
            requeued += r
            failed += f
        report.requeued, report.failed = requeued, failed
        return report

    def _requeue(self, items: Sequence[tuple[str, str, str]], report: WritebackReport,
                 tally: LatencyTally, groups: Mapping[str, str] | None = None,
                 charged: bool = True) -> tuple[int, int]:
        finished = now()
        groups = groups or {}
        answers = run_pipelined(self.client, REQUEUE_SCRIPT, [
            self._requeue_call(*item, finished, groups.get(item[0], ""), charged)
            for item in items])
        requeued, failed, untouched = settle_attempts(
            [item[0] for item in items], answers, finished, tally, self.notify)
        report.unchanged += untouched
        return requeued, failed


def _response_id(result: dict[str, Any] | None) -> str | None:
    response = (result or {}).get("response")
    if isinstance(response, dict) and response.get("object") == "response":
        rid = response.get("id")
        return rid if isinstance(rid, str) and rid else None
    return None


def remember_responses(client: redis.Redis, settings: Settings, ids: Mapping[str, str]) -> None:
    """Map each upstream Response id to its request (`Keys.response`), for
    ``GET /v1/responses/{id}``; kept as long as the results."""
    keys = Keys(settings.key_prefix)
    pipe = client.pipeline(transaction=False)
    for response_id, request_id in ids.items():
        pipe.set(keys.response(response_id[:200]), request_id, ex=settings.result_ttl_s)
    pipe.execute()


def settle_attempts(ids: Sequence[str], answers: Sequence[Any], finished: float,
                    tally: LatencyTally, notify: Notify) -> tuple[int, int, int]:
    """Count the answers of a script that spends one of each request's attempts (REQUEUE,
    COUNT_REFUSAL: ``{1 | 2 failed | 0 untouched, callback_url, created_at}``) as
    `(kept going, failed, untouched)`; a request that failed has its latency tallied and its
    callback scheduled."""
    kept = failed = untouched = 0
    for request_id, raw in zip(ids, answers, strict=True):
        code = int(raw[0])
        if code == 1:
            kept += 1
        elif code == 2:
            failed += 1
            tally.observe_raw("failed", raw[2], finished)
            if raw[1]:
                notify(request_id)
        else:
            untouched += 1
    return kept, failed, untouched


def cost_of(settings: Settings, model: str, usage: dict[str, Any] | None,
            emulated: bool = False) -> Decimal:
    """The price of one batch result (exposed for tests and reports)."""
    return ledger_increments(settings, "batch", model, usage, emulated=emulated)[0]
