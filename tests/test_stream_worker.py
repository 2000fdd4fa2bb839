"""The plain streaming function (no Celery): claim, relay, retries, resume, cancel, taking over a
stream whose worker was lost.

Runs `hybrid_router.workers.stream.relay.run_stream` in the test process against the real simulator over HTTP and
the private Redis; each test uses its own prompt so simulator counters do not mix.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_stats
from hybrid_router.workers.stream.claim import ClaimOutcome, aclaim
from hybrid_router.workers.stream.context import StreamContext
from hybrid_router.workers.stream.relay import run_stream
from hybrid_router.workers.stream.sweep import sweep_streams
from tests.support import wait_until

MODEL = "gpt-4o-mini"


class NoDispatch:
    """The intake's dispatcher port; these tests run the stream function themselves."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def dispatch(self, request_id: str) -> None:
        self.sent.append(request_id)


def messages(directive: str = "") -> Any:
    return [{"role": "user", "content": f"Explain streams {uuid.uuid4().hex} {directive}"}]


def direct_answer(sim_url: str, msgs: Any) -> str:
    """The upstream's answer to the same messages, asked directly with the openai SDK.

    Called after the stream, when the prompt's injected faults are used up.
    """
    client = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=msgs)
    return reply.choices[0].message.content or ""


@pytest.fixture
def ctx(make_settings: Callable[..., Settings], sim_url: str) -> Iterator[StreamContext]:
    settings = make_settings(upstream_base_url=sim_url, retry_backoff_base_s=0.01,
                             retry_backoff_max_s=0.05, stream_lease_s=1.0)
    context = StreamContext.build(settings)
    yield context
    context.close()


def claim(request_id: str, ctx: StreamContext) -> ClaimOutcome:
    """One claim of `request_id`, as the process's stream engine makes it."""
    return ctx.engine.call(aclaim(request_id, ctx, ctx.engine.runtime.store))[0]


def submit(ctx: StreamContext, msgs: list[dict[str, Any]], **fields: Any) -> str:
    req = SubmitRequest.model_validate({"model": MODEL, "messages": msgs, "priority": "high",
                                        **fields})
    return accept_sync(prepare(req, "default", ctx.settings), ctx.store, NoDispatch()).record.id


def tokens_of(ctx: StreamContext, request_id: str) -> list[dict[str, Any]]:
    return [e for e in ctx.store.events_after(request_id) if e["type"] == "token"]


def assert_contiguous(ctx: StreamContext, request_id: str) -> list[dict[str, Any]]:
    events = ctx.store.events_after(request_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    return events


def test_stream_completes_with_the_direct_answer(ctx: StreamContext, sim_url: str) -> None:
    msgs = messages()
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "completed"
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "completed"
    expected = direct_answer(sim_url, msgs)
    assert record.result is not None and record.result.content == expected
    assert "".join(e["content"] for e in tokens_of(ctx, request_id)) == expected
    events = assert_contiguous(ctx, request_id)
    assert [e["type"] for e in events][:2] == ["accepted", "started"]
    assert events[-1]["type"] == "done" and events[-1]["content_length"] == len(expected)
    assert record.usage is not None and record.usage.completion_tokens > 0
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.started_at and record.first_token_at and record.finished_at
    ledger = Ledger.from_hash(ctx.redis.hgetall(ctx.keys.ledger()))
    assert ledger.total("stream").requests == 1
    assert ledger.total("stream").cost_usd == record.cost_usd
    assert not ctx.redis.zscore(ctx.keys.dispatched(), request_id)
    assert not ctx.redis.exists(ctx.keys.lease(request_id))
    timings = ctx.redis.hgetall(ctx.keys.timings("stream"))
    assert timings[b"ttft|n"] == b"1" and timings[b"e2e|n"] == b"1"


@pytest.mark.parametrize("directive", [
    "[[sim:fail=429,times=2,retry_after=0.05]]",
    "[[sim:fail=500,times=2]]",
])
def test_retries_before_the_first_token_are_invisible(ctx: StreamContext, sim_url: str,
                                                      directive: str) -> None:
    msgs = messages(directive)
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "completed"
    stats = sim_stats(sim_url, prompt_hash(msgs))
    assert stats["errors_injected"] == 2 and stats["streams_completed"] == 1
    expected = direct_answer(sim_url, msgs)
    events = assert_contiguous(ctx, request_id)
    assert "".join(e["content"] for e in events if e["type"] == "token") == expected
    assert [e["type"] for e in events].count("error") == 0


def test_mid_stream_drop_resumes_seamlessly(ctx: StreamContext, sim_url: str) -> None:
    msgs = messages("[[sim:drop_after=7,tokens=30]]")
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "completed"
    stats = sim_stats(sim_url, prompt_hash(msgs))
    assert stats["streams_dropped"] == 1 and stats["continuations"] == 1
    expected = direct_answer(sim_url, msgs)
    record = ctx.store.get(request_id)
    assert record is not None and record.result is not None
    assert record.result.content == expected
    events = assert_contiguous(ctx, request_id)
    assert "".join(e["content"] for e in events if e["type"] == "token") == expected
    # Paid: the dropped attempt (estimated) plus the continuation (reported).
    assert record.usage is not None and record.usage.completion_tokens == 30


def test_drop_without_retry_budget_fails_keeping_the_partial_content(
        make_settings: Callable[..., Settings], sim_url: str) -> None:
    """With no retry left the resume is not attempted: `failed`, error event, partial kept."""
    settings = make_settings(upstream_base_url=sim_url, stream_max_retries=0)
    ctx = StreamContext.build(settings)
    try:
        msgs = messages("[[sim:drop_after=4,tokens=30]]")
        request_id = submit(ctx, msgs)
        assert run_stream(request_id, ctx) == "failed"
        record = ctx.store.get(request_id)
        assert record is not None and record.status == "failed"
        assert record.error is not None and record.error.code == "stream_interrupted"
        assert record.error.retryable
        events = assert_contiguous(ctx, request_id)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "stream_interrupted"
        partial = "".join(e["content"] for e in events if e["type"] == "token")
        assert record.result is not None and record.result.content == partial
        assert direct_answer(sim_url, msgs).startswith(partial) and len(partial) > 0
        assert record.usage is not None and record.usage.completion_tokens == 4
    finally:
        ctx.close()


def test_non_retryable_4xx_fails_with_the_upstream_message(ctx: StreamContext,
                                                           sim_url: str) -> None:
    msgs = messages("[[sim:fail=400]]")
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "failed"
    assert sim_stats(sim_url, prompt_hash(msgs))["requests"] == 1  # not retried
    record = ctx.store.get(request_id)
    assert record is not None and record.error is not None
    assert record.error.code == "upstream_400" and not record.error.retryable
    assert "400" in record.error.message
    assert ctx.store.events_after(request_id)[-1]["type"] == "error"


def test_retries_exhausted_before_first_token(ctx: StreamContext, sim_url: str) -> None:
    msgs = messages("[[sim:fail=503,retry_after=0.01]]")
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "failed"
    assert sim_stats(sim_url, prompt_hash(msgs))["requests"] == ctx.settings.stream_max_retries + 1
    record = ctx.store.get(request_id)
    assert record is not None and record.error is not None
    assert record.error.code == "upstream_503" and record.error.retryable
    assert "gave up" in record.error.message
    assert not tokens_of(ctx, request_id)


def test_redelivered_task_never_calls_the_upstream_twice(ctx: StreamContext,
                                                         sim_url: str) -> None:
    msgs = messages()
    request_id = submit(ctx, msgs)
    assert run_stream(request_id, ctx) == "completed"
    assert run_stream(request_id, ctx) == "terminal"
    assert sim_stats(sim_url, prompt_hash(msgs))["requests"] == 1


def test_duplicate_while_streaming_is_dropped(ctx: StreamContext, sim_url: str) -> None:
    msgs = messages("[[sim:tps=50,tokens=40]]")
    request_id = submit(ctx, msgs)
    runner = threading.Thread(target=run_stream, args=(request_id, ctx))
    runner.start()
    wait_until(lambda: tokens_of(ctx, request_id), 5, message="first token")
    assert claim(request_id, ctx) == "duplicate"
    runner.join(10)
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "completed"
    assert sim_stats(sim_url, prompt_hash(msgs))["requests"] == 1


def _as_if_a_worker_died_after(ctx: StreamContext, request_id: str, tokens: list[str]) -> None:
    """Leave `request_id` as a stream worker killed after relaying `tokens` leaves it:
    ``streaming``, in the running index, its tokens in the replay log, and no lease."""
    ctx.store.transition(request_id, "streaming", allowed_from=["dispatched"],
                         incr_attempts=True)
    ctx.redis.zadd(ctx.keys.streaming(), {request_id: 1.0})
    for n, token in enumerate(tokens):
        assert ctx.store.run(ctx.store.ops.emit_tokens(request_id, "dead-worker", n, 1,
                                                       [ev.token(token)])) > 0


def _split_tokens(text: str) -> list[str]:
    """The simulator's deltas of an answer: each word with the space before it."""
    return re.findall(r"\s*\S+", text)


def test_a_stream_whose_worker_died_is_resumed_from_its_last_token(
        ctx: StreamContext, sim_url: str) -> None:
    """A live worker takes over a stream whose worker is gone: it continues from the replay
    log with a prefill continuation, and the subscriber's sequence is gapless, duplicate-free
    and exactly the upstream's one answer. The lost run's tokens are paid once."""
    msgs = messages("[[sim:tokens=30]]")
    answer = direct_answer(sim_url, msgs)
    tokens = _split_tokens(answer)
    assert "".join(tokens) == answer and len(tokens) == 30
    request_id = submit(ctx, msgs)
    _as_if_a_worker_died_after(ctx, request_id, tokens[:12])
    assert run_stream(request_id, ctx) == "completed"
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "completed"
    assert record.result is not None and record.result.content == answer
    events = assert_contiguous(ctx, request_id)
    assert "".join(e["content"] for e in events if e["type"] == "token") == answer
    assert [e["type"] for e in events].count("done") == 1
    stats = sim_stats(sim_url, prompt_hash(msgs))
    assert stats["continuations"] == 1 and stats["requests"] == 2
    assert record.usage is not None and record.usage.completion_tokens == 30
    assert record.attempts == 2 and record.content_tokens_relayed == 30
    ledger = Ledger.from_hash(ctx.redis.hgetall(ctx.keys.ledger()))
    assert ledger.total("stream").completion_tokens == 30
    assert ledger.total("stream").cost_usd == record.cost_usd
    assert ctx.redis.zscore(ctx.keys.streaming(), request_id) is None


@pytest.mark.parametrize("overrides, reason", [
    ({"stream_max_retries": 0}, "retry budget is spent"),
    ({"stream_resume": False}, "cannot continue a message"),
])
def test_a_lost_stream_that_cannot_be_resumed_fails_saying_why(
        make_settings: Callable[..., Settings], sim_url: str, overrides: dict[str, Any],
        reason: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, **overrides)
    ctx = StreamContext.build(settings)
    try:
        msgs = messages()
        request_id = submit(ctx, msgs)
        _as_if_a_worker_died_after(ctx, request_id, [" partial", " text"])
        assert run_stream(request_id, ctx) == "failed"
        record = ctx.store.get(request_id)
        assert record is not None and record.status == "failed"
        assert record.error is not None and record.error.code == "worker_lost"
        assert reason in record.error.message and record.error.retryable
        assert record.result is not None and record.result.content == " partial text"
        assert record.usage is not None and record.usage.completion_tokens == 2  # paid for
        assert sim_stats(sim_url, prompt_hash(msgs))["requests"] == 0
        events = ctx.store.events_after(request_id)
        assert [e["type"] for e in events][-1] == "error"
        assert ctx.redis.zscore(ctx.keys.streaming(), request_id) is None
    finally:
        ctx.close()


def test_sweep_resumes_orphans_and_redispatches_stale_requests(
        make_settings: Callable[..., Settings], sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, stream_redispatch_after_s=0.2)
    ctx = StreamContext.build(settings)
    try:
        orphan = submit(ctx, messages())
        ctx.store.transition(orphan, "streaming", allowed_from=["dispatched"])
        ctx.redis.zadd(ctx.keys.streaming(), {orphan: 1})
        leased = submit(ctx, messages())
        ctx.store.transition(leased, "streaming", allowed_from=["dispatched"])
        ctx.redis.zadd(ctx.keys.streaming(), {leased: 1})
        ctx.redis.set(ctx.keys.lease(leased), "a-live-worker")
        stale = submit(ctx, messages())
        resumed: list[str] = []
        sent: list[str] = []
        wait_until(lambda: sweep_streams(ctx, resumed.append, sent.append, 10).redispatched, 5,
                   message="stale dispatched request sent again")
        assert sent == [stale]
        assert set(resumed) == {orphan}  # the leased one has a live worker
        # With a confirmation window, a stream without a lease is taken over only once it has
        # had none for that long (a live worker renews a lapsed lease within a second).
        ctx.redis.delete(ctx.keys.lease(leased))
        seen: dict[str, float] = {}
        first = time.monotonic()
        taken: list[str] = []
        assert sweep_streams(ctx, taken.append, sent.append, 10, seen, 0.5).resumed == 0
        assert set(seen) == {orphan, leased} and not taken
        wait_until(lambda: sweep_streams(ctx, taken.append, sent.append, 10, seen, 0.5).resumed,
                   5, message="the lease-less streams taken over after the window")
        assert set(taken) == {orphan, leased} and time.monotonic() - first >= 0.5
        assert not seen
        assert sweep_streams(ctx, resumed.append, sent.append, 0).resumed == 0  # no capacity
        assert run_stream(orphan, ctx) == "completed"
        assert run_stream(stale, ctx) == "completed"
        assert not ctx.redis.zscore(ctx.keys.dispatched(), stale)
    finally:
        ctx.close()


def test_cancel_stops_the_upstream_and_records_paid_tokens(ctx: StreamContext,
                                                           sim_url: str) -> None:
    msgs = messages("[[sim:tps=20,tokens=200]]")
    request_id = submit(ctx, msgs)
    outcome: list[str] = []
    runner = threading.Thread(target=lambda: outcome.append(run_stream(request_id, ctx)))
    runner.start()
    wait_until(lambda: len(tokens_of(ctx, request_id)) >= 3, 5, message="three tokens")
    assert ctx.store.cancel(request_id, MODEL)[0] == "cancelled"
    runner.join(5)
    assert outcome == ["cancelled"]
    ph = prompt_hash(msgs)
    wait_until(lambda: sim_stats(sim_url, ph)["streams_aborted"] == 1, 5,
               message="upstream saw the stream aborted")
    record = ctx.store.get(request_id)
    assert record is not None and record.status == "cancelled"
    relayed = len(tokens_of(ctx, request_id))
    assert record.usage is not None
    # Paid for: what was relayed, plus the token whose publish was refused (it revealed the
    # cancel) and at most the one read before the publisher's answer came back.
    assert relayed <= record.usage.completion_tokens <= relayed + 2
    assert record.cost_usd is not None and record.cost_usd > 0
    assert record.usage.completion_tokens < 40
    ledger = Ledger.from_hash(ctx.redis.hgetall(ctx.keys.ledger()))
    assert ledger.total("stream").completion_tokens == record.usage.completion_tokens
    events = ctx.store.events_after(request_id)
    assert events[-1]["type"] == "cancelled"


def test_terminal_callback_is_scheduled_once(make_settings: Callable[..., Settings],
                                             sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, callback_allowed_hosts=["hooks.example"])
    ctx = StreamContext.build(settings)
    notified: list[str] = []
    ctx.notify = notified.append
    try:
        with_callback = submit(ctx, messages(), callback_url="https://hooks.example/done")
        without = submit(ctx, messages())
        assert run_stream(with_callback, ctx) == "completed"
        assert run_stream(without, ctx) == "completed"
        assert run_stream(with_callback, ctx) == "terminal"
        assert notified == [with_callback]
    finally:
        ctx.close()


def test_idle_and_total_timeouts_are_enforced_in_the_task(
        make_settings: Callable[..., Settings], sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, stream_max_retries=0,
                             stream_idle_timeout_s=0.3, stream_total_timeout_s=0.6)
    ctx = StreamContext.build(settings)
    try:
        idle = submit(ctx, messages("[[sim:ttft=3]]"))
        assert run_stream(idle, ctx) == "failed"
        record = ctx.store.get(idle)
        assert record is not None and record.error is not None
        assert record.error.code == "upstream_timeout"
        slow = submit(ctx, messages("[[sim:tps=20,tokens=200]]"))
        assert run_stream(slow, ctx) == "failed"
        record = ctx.store.get(slow)
        assert record is not None and record.error is not None
        assert record.error.code == "timeout" and not record.error.retryable
        assert record.result is not None and 0 < len(record.result.content.split()) < 40
    finally:
        ctx.close()


def test_a_stream_runs_end_counts_its_cost_once(ctx: StreamContext) -> None:
    """`END_STREAM_RUN_SCRIPT`: the lease goes back only if still ours, the running index is
    left, and a run's increments count once however often its end is written (a retry after a
    lost reply, or an end repeated after a later error: the chaos test's double count)."""
    from hybrid_router.router.core.lua import END_STREAM_RUN_SCRIPT

    keys = ctx.keys
    mine, theirs, run = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    for request_id in (mine, theirs):
        ctx.redis.zadd(keys.streaming(), {request_id: 1.0})
    ctx.redis.set(keys.lease(mine), ctx.leases.owner)
    ctx.redis.set(keys.lease(theirs), "another-worker")

    def end(request_id: str, run_id: str, tokens: int) -> Any:
        return END_STREAM_RUN_SCRIPT(
            ctx.redis, [keys.record(request_id), keys.accounted(request_id, run_id),
                        keys.lease(request_id),
                        keys.streaming(), keys.ledger(), keys.timings("stream")],
            [ctx.leases.owner, request_id, 60, 4, "stream|m|completion_tokens", tokens,
             5, "ttft|n", 1])

    assert [end(mine, run, 7), end(mine, run, 7)] == [1, 0]
    assert end(mine, uuid.uuid4().hex, 3) == 1  # another run of the same request counts
    assert end(theirs, run, 5) == 1
    ledger = ctx.redis.hgetall(keys.ledger())
    assert int(ledger[b"stream|m|completion_tokens"]) == 7 + 3 + 5
    assert int(ctx.redis.hget(keys.timings("stream"), "ttft|n") or 0) == 3
    assert ctx.redis.exists(keys.lease(mine)) == 0
    assert ctx.redis.get(keys.lease(theirs)) == b"another-worker"
    assert ctx.redis.zcard(keys.streaming()) == 0
    assert 0 < ctx.redis.ttl(keys.accounted(mine, run)) <= 60
    # A request still streaming keeps its running-index entry (the sweep resumes it): a run
    # that could not write its end (Redis was away) never hides its request.
    streaming = submit(ctx, messages())
    ctx.store.transition(streaming, "streaming", allowed_from=["dispatched"])
    ctx.redis.zadd(keys.streaming(), {streaming: 1.0})
    ctx.redis.set(keys.lease(streaming), ctx.leases.owner)
    end(streaming, run, 1)
    assert ctx.redis.zscore(keys.streaming(), streaming) is not None
    assert ctx.redis.exists(keys.lease(streaming)) == 0


def test_a_stream_runs_end_is_written_with_the_records_last_write(ctx: StreamContext) -> None:
    """The record's cost and the ledger move in one script (`RunEnd` on TRANSITION/ANNOTATE):
    a worker killed right after the record became `completed` cannot leave the ledger without
    that run. A refused move writes nothing; an annotation ends the run either way."""
    from hybrid_router.router.core.store import RunEnd

    keys = ctx.keys

    def run_end(request_id: str, run_id: str, tokens: int) -> RunEnd:
        return RunEnd([keys.accounted(request_id, run_id), keys.lease(request_id),
                       keys.streaming(), keys.ledger()],
                      [ctx.leases.owner, request_id, 60, 4, "stream|m|completion_tokens",
                       tokens])

    def ledger_tokens() -> int:
        return int(ctx.redis.hget(keys.ledger(), "stream|m|completion_tokens") or 0)

    request_id = submit(ctx, messages())
    ctx.store.transition(request_id, "streaming", allowed_from=["dispatched"])
    ctx.redis.set(keys.lease(request_id), ctx.leases.owner)
    ctx.redis.zadd(keys.streaming(), {request_id: 1.0})
    moved = ctx.store.transition(request_id, "completed", allowed_from=["streaming"],
                                 fields={"usage": {"completion_tokens": 9}},
                                 run_end=run_end(request_id, "run-1", 9))
    record = ctx.store.get(request_id)
    assert moved.moved and record is not None and record.status == "completed"
    assert record.usage is not None and record.usage.completion_tokens == 9
    assert ledger_tokens() == 9
    assert not ctx.redis.exists(keys.lease(request_id))
    assert ctx.redis.zscore(keys.streaming(), request_id) is None

    # A move refused (the request is already terminal) ends nothing and counts nothing.
    ctx.redis.set(keys.lease(request_id), ctx.leases.owner)
    refused = ctx.store.transition(request_id, "failed", allowed_from=["streaming"],
                                   run_end=run_end(request_id, "run-2", 5))
    assert not refused.moved and ledger_tokens() == 9
    assert ctx.redis.get(keys.lease(request_id)) == ctx.leases.owner.encode()

    # The tokens a stopped run paid for go to the record and the ledger together, once.
    for _ in range(2):
        assert ctx.store.annotate(request_id, {"usage": {"completion_tokens": 5}},
                                  run_end(request_id, "run-2", 5))
    assert ledger_tokens() == 14 and not ctx.redis.exists(keys.lease(request_id))
    # A record that is gone still has its paid run counted.
    assert not ctx.store.annotate("gone" + request_id, {"usage": {"completion_tokens": 1}},
                                  run_end("gone" + request_id, "run-3", 1))
    assert ledger_tokens() == 15
