"""Plain batch-lane functions without Celery: JSONL, claim/release, flush crash safety,
write-back idempotency, line parsing, callback policy. Real Redis, real simulator."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from decimal import Decimal

import httpx
import openai
import orjson
import pytest
import redis

from hybrid_router.router.core.callback_policy import callback_refusal
from hybrid_router.router.core.callback_signature import sign
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.pricing import cost_usd
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from hybrid_router.workers.batch.flush import FlushContext, flush
from hybrid_router.workers.batch.jsonl import write_parts
from hybrid_router.workers.batch.poll import PollContext, batch_meta, check_batch, write_back_batch
from hybrid_router.workers.batch.writeback import parse_line
from hybrid_router.workers.retry import is_refusal
from hybrid_router.workers.upstream.base import make_openai_client
from tests.batch_helpers import event_types, record, submit_low
from tests.support import free_port, wait_until


def _ids(client: redis.Redis, key: str) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in client.lrange(key, 0, -1)]


def test_jsonl_parts_respect_request_and_byte_limits() -> None:
    lines = [(f"id{i}", orjson.dumps({"model": "m", "messages": [{"role": "user",
                                                                   "content": "x" * i}]}))
             for i in range(10)]
    parts = list(write_parts(iter(lines), max_requests=4, max_bytes=10_000))
    assert [len(p.ids) for p in parts] == [4, 4, 2]
    for part in parts:
        rows = [orjson.loads(x) for x in part.path.read_bytes().splitlines()]
        assert [r["custom_id"] for r in rows] == part.ids
        assert all(r["method"] == "POST" and r["url"] == "/v1/chat/completions" for r in rows)
        assert part.size == part.path.stat().st_size
        part.remove()
    small = list(write_parts(iter(lines), max_requests=100, max_bytes=400))
    assert all(p.size <= 400 for p in small) and sum(len(p.ids) for p in small) == 10
    for part in small:
        part.remove()


def test_jsonl_memory_stays_flat_for_50k_lines() -> None:
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "y" * 1000}]})
    tracemalloc.start()
    try:
        parts = list(write_parts(((f"{i:032x}", body) for i in range(50_000)), 50_000,
                                 200 * 1024 * 1024))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(parts) == 1 and len(parts[0].ids) == 50_000
    assert parts[0].size > 50_000_000  # a 50 MB file ...
    assert peak < 15_000_000  # ... written with a small fraction of it in memory
    parts[0].remove()


def test_claim_release_keeps_order_and_skips_cancelled(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"claim {i}") for i in range(5)]
    claim = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 3)
    assert claim is not None and claim.ids == ids[:3]
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == ids[3:]
    assert _ids(redis_client, keys.claimed(claim.claim_id)) == ids[:3]
    RequestStore(redis_client, settings).cancel(ids[1], "gpt-4o-mini")
    assert batch_claim.recover_orphaned_claims(redis_client, keys) == 2
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == [ids[0], ids[2], *ids[3:]]
    assert redis_client.zcard(keys.claims()) == 0
    assert not redis_client.exists(keys.claimed(claim.claim_id))
    # A claim listing an id twice (a release interrupted and run again) puts it back once.
    again = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 1)
    assert again is not None and again.ids == [ids[0]]
    redis_client.rpush(keys.claimed(again.claim_id), ids[0])
    assert batch_claim.recover_orphaned_claims(redis_client, keys) == 1
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == [ids[0], ids[2], *ids[3:]]


def _ctx(settings: Settings, client: redis.Redis, **kw: object) -> FlushContext:
    return FlushContext(settings, client, make_openai_client(settings),
                        **kw)  # type: ignore[arg-type]


def _written_back(settings: Settings, client: redis.Redis, batch_id: str) -> PollContext:
    """Poll `batch_id` until the upstream has finished it and it is written back; the context
    polled with (its `upstream` is the SDK client)."""
    ctx = PollContext(settings, client, make_openai_client(settings))
    wait_until(lambda: check_batch(ctx, batch_id), 15, 0.1, message="batch completed")
    return ctx


def test_flush_killed_after_claim_loses_nothing(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"crash {i}") for i in range(6)]

    def die(_claim: batch_claim.Claim) -> None:
        raise RuntimeError("worker killed mid-flush")

    with pytest.raises(RuntimeError):
        flush(_ctx(settings, redis_client, after_claim=die))
    assert redis_client.llen(keys.pending("gpt-4o-mini")) == 0
    assert redis_client.zcard(keys.claims()) == 1
    assert not redis_client.exists(keys.flush_lock())  # released on the way out
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)
    report = flush(_ctx(settings, redis_client))
    assert report.recovered == 6 and report.submitted == 6 and len(report.batches) == 1
    batch_id = report.batches[0]["batch_id"]
    for request_id in ids:
        rec = record(redis_client, settings, request_id)
        assert rec.status == "submitted" and rec.batch_id == batch_id
        assert event_types(redis_client, settings, request_id).count("submitted") == 1
    assert redis_client.zcard(keys.claims()) == 0
    assert redis_client.scard(keys.batch_requests(batch_id)) == 6


def test_flush_that_lost_its_lock_makes_no_batch_and_leaves_its_claim_to_the_holder(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """A flush stalled longer than its lock's lease (here: the lock handed to another flush
    during the upload) must not make a batch: the holder may already have settled its claim
    and put the requests back, and they would be sent twice."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"lock lost {i}") for i in range(3)]
    uploads: list[str] = []

    def lock_taken_over(file_id: str) -> None:
        uploads.append(file_id)
        redis_client.set(keys.flush_lock(), "another flush's token")

    report = flush(_ctx(settings, redis_client, before_create=lock_taken_over))
    assert report.error is not None and "lock was lost" in report.error
    assert report.submitted == 0 and report.batches == []
    upstream = make_openai_client(settings)
    [upload] = uploads
    assert not [b for b in upstream.batches.list(limit=100) if b.input_file_id == upload]
    assert redis_client.get(keys.flush_lock()) == b"another flush's token"  # not released
    assert redis_client.zcard(keys.claims()) == 1  # left as it was, for the holder
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)

    redis_client.delete(keys.flush_lock())  # the other flush is gone: the next one settles
    report = flush(_ctx(settings, redis_client))
    assert report.error is None
    assert report.recovered == 3 and report.submitted == 3 and len(report.batches) == 1
    batch_id = report.batches[0]["batch_id"]
    assert all(record(redis_client, settings, i).batch_id == batch_id for i in ids)
    assert redis_client.zcard(keys.claims()) == 0
    with pytest.raises(openai.NotFoundError):
        upstream.files.retrieve(upload)  # the orphaned upload was deleted


def test_an_emulated_flush_that_lost_its_lock_records_no_batch(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """The same fence on the emulated lane: no batch is recorded (so none is run and paid)
    by a flush whose lock another flush now holds; the claim is left to that flush."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="emulated")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"emulated lock lost {i}") for i in range(3)]

    def lock_taken_over(_claim: batch_claim.Claim) -> None:
        redis_client.set(keys.flush_lock(), "another flush's token")

    report = flush(_ctx(settings, redis_client, after_claim=lock_taken_over))
    assert report.error is not None and "lock was lost" in report.error
    assert report.submitted == 0 and report.batches == []
    assert redis_client.zcard(keys.batches_in_flight()) == 0
    assert redis_client.zcard(keys.claims()) == 1
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)
    redis_client.delete(keys.flush_lock())
    report = flush(_ctx(settings, redis_client))
    assert report.recovered == 3 and report.submitted == 3 and len(report.batches) == 1
    assert all(record(redis_client, settings, i).status == "submitted" for i in ids)


def test_flush_upload_failure_puts_requests_back_untouched(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    settings = make_settings(upstream_base_url=f"http://127.0.0.1:{free_port()}/v1",
                             batch_mode="native", upstream_timeout_s=2)
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"down {i}") for i in range(4)]
    later = submit_low(redis_client, settings, "other model", model="gpt-4o")
    report = flush(_ctx(settings, redis_client))
    assert report.error and report.submitted == 0
    assert report.requeued_on_error == 1  # gpt-4o (first) failed; the flush stopped there
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == ids
    assert _ids(redis_client, keys.pending("gpt-4o")) == [later]
    for request_id in ids:
        assert record(redis_client, settings, request_id).status == "queued"
        assert record(redis_client, settings, request_id).attempts == 0
        assert event_types(redis_client, settings, request_id) == ["accepted", "queued"]
    assert redis_client.zcard(keys.claims()) == 0
    assert redis_client.zcard(keys.batches_in_flight()) == 0


@pytest.fixture(scope="module")
def sim_without_batch_api() -> Iterator[str]:
    """An upstream with no Batch API: /v1/files and /v1/batches answer 404, every time."""
    from hybrid_router.simulator.testing import running_simulator

    with running_simulator(ttft_s=0.0, tokens_per_s=0.0, batch_api=False) as url:
        yield url


def test_a_submission_the_upstream_refuses_counts_as_an_attempt_and_ends_failed(
        make_settings: Callable[..., Settings], redis_client: redis.Redis,
        sim_without_batch_api: str) -> None:
    """A 4xx that waiting will not cure (here: batch mode forced to native against an upstream
    without a Batch API) must not send the same requests round every flush forever: each
    refusal is one of their ROUTER_BATCH_MAX_ATTEMPTS submissions, then they fail, once,
    with the upstream's answer."""
    settings = make_settings(upstream_base_url=sim_without_batch_api, batch_mode="native",
                             batch_max_attempts=3, callback_allowed_hosts=["127.0.0.1:*"])
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"refused {i}",
                      **({"callback_url": "http://127.0.0.1:9/hook"} if i == 0 else {}))
           for i in range(3)]
    notified: list[str] = []
    for attempt in (1, 2):
        report = flush(_ctx(settings, redis_client, notify=notified.append))
        assert report.error and report.submitted == 0 and report.failed == 0
        assert report.requeued_on_error == 3
        assert _ids(redis_client, keys.pending("gpt-4o-mini")) == ids  # queue order kept
        for request_id in ids:
            rec = record(redis_client, settings, request_id)
            assert (rec.status, rec.attempts) == ("queued", attempt)
    report = flush(_ctx(settings, redis_client, notify=notified.append))
    assert report.failed == 3 and report.requeued_on_error == 0
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == []
    assert redis_client.zcard(keys.claims()) == 0
    for request_id in ids:
        rec = record(redis_client, settings, request_id)
        assert rec.status == "failed" and rec.error is not None
        assert rec.error.code == "batch_refused" and "404" in rec.error.message
        assert "ROUTER_BATCH_MAX_ATTEMPTS" in rec.error.message
        assert event_types(redis_client, settings, request_id) == [
            "accepted", "queued", "error"]
    assert notified == [ids[0]]  # the one with a callback_url
    # Nothing is left to flush, and nothing more happens to a failed request.
    again = flush(_ctx(settings, redis_client, notify=notified.append))
    assert again.error is None and again.failed == 0 and again.requeued_on_error == 0
    assert all(record(redis_client, settings, i).attempts == 3 for i in ids)


@pytest.mark.parametrize(("status", "refused"), [
    (400, True), (401, True), (403, True), (404, True), (413, True), (422, True),
    (408, False), (409, False), (429, False), (500, False), (502, False), (503, False)])
def test_only_a_4xx_that_waiting_will_not_cure_is_a_refusal(status: int, refused: bool) -> None:
    request = httpx.Request("POST", "http://upstream.test/v1/batches")
    exc = openai.APIStatusError("answer", response=httpx.Response(status, request=request),
                                body=None)
    assert is_refusal(exc) is refused
    assert not is_refusal(openai.APIConnectionError(request=request))


def test_cancelled_after_submit_its_billed_line_is_recorded_once(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """The Batch API cannot cancel one line: a request cancelled while `submitted` still runs
    and is billed. Its usage and cost go on the cancelled record and into the ledger, once, so
    the ledger matches what the upstream charged; it stays `cancelled`, with one final event."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"cancel after submit {i}") for i in range(3)]
    report = flush(_ctx(settings, redis_client))
    batch_id = report.batches[0]["batch_id"]
    cancelled = ids[1]
    assert record(redis_client, settings, cancelled).status == "submitted"
    assert RequestStore(redis_client, settings).cancel(cancelled, "gpt-4o-mini") == (
        "cancelled", "submitted")
    ctx = _written_back(settings, redis_client, batch_id)
    upstream = ctx.upstream

    batch = upstream.batches.retrieve(batch_id)
    assert batch.output_file_id is not None
    billed = {line["custom_id"]: line["response"]["body"]["usage"] for line in
              map(orjson.loads, upstream.files.content(batch.output_file_id).text.splitlines())}
    assert set(billed) == set(ids)  # the cancelled request's line ran too
    rec = record(redis_client, settings, cancelled)
    assert rec.status == "cancelled" and rec.result is None
    assert rec.usage is not None
    assert rec.usage.completion_tokens == billed[cancelled]["completion_tokens"] > 0
    assert rec.usage.prompt_tokens == billed[cancelled]["prompt_tokens"]
    assert rec.cost_usd == cost_usd(settings, "gpt-4o-mini", billed[cancelled], "batch") > 0
    assert event_types(redis_client, settings, cancelled) == [
        "accepted", "queued", "submitted", "cancelled"]
    for other in (ids[0], ids[2]):
        assert record(redis_client, settings, other).status == "completed"
    ledger_before = redis_client.hgetall(keys.ledger())
    line = Ledger.from_hash(ledger_before).total("batch")
    records = [record(redis_client, settings, i) for i in ids]
    assert line.requests == 3
    assert line.cost_usd == sum((r.cost_usd or Decimal(0) for r in records), Decimal(0))
    assert line.completion_tokens == sum(u["completion_tokens"] for u in billed.values())

    again = write_back_batch(ctx, batch_id, "gpt-4o-mini", batch)
    assert (again.completed, again.paid_after_cancel, again.unchanged) == (0, 0, 3)
    assert redis_client.hgetall(keys.ledger()) == ledger_before
    assert event_types(redis_client, settings, cancelled)[-1] == "cancelled"


def test_cancelled_while_queued_is_never_charged(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """A request cancelled before any flush leaves the queue: no batch line, no cost."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"cancel queued {i}") for i in range(2)]
    RequestStore(redis_client, settings).cancel(ids[0], "gpt-4o-mini")
    report = flush(_ctx(settings, redis_client))
    batch_id = report.batches[0]["batch_id"]
    _written_back(settings, redis_client, batch_id)
    rec = record(redis_client, settings, ids[0])
    assert rec.status == "cancelled" and rec.cost_usd is None and rec.batch_id is None
    assert record(redis_client, settings, ids[1]).status == "completed"
    assert Ledger.from_hash(redis_client.hgetall(keys.ledger())).total("batch").requests == 1


def test_write_back_twice_changes_nothing(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"twice {i}") for i in range(5)]
    report = flush(_ctx(settings, redis_client))
    batch_id = report.batches[0]["batch_id"]
    ctx = _written_back(settings, redis_client, batch_id)
    assert redis_client.zcard(keys.batches_in_flight()) == 0
    ledger_before = redis_client.hgetall(keys.ledger())
    events_before = {i: event_types(redis_client, settings, i) for i in ids}
    assert all(e[-1] == "done" for e in events_before.values())
    again = write_back_batch(ctx, batch_id, "gpt-4o-mini",
                             ctx.upstream.batches.retrieve(batch_id))
    assert (again.completed, again.failed, again.requeued, again.unchanged) == (0, 0, 0, 5)
    assert redis_client.hgetall(keys.ledger()) == ledger_before
    assert {i: event_types(redis_client, settings, i) for i in ids} == events_before
    ledger = Ledger.from_hash(ledger_before).total("batch")
    assert ledger.requests == 5 and ledger.cost_usd > 0
    assert ledger.savings_usd == ledger.standard_cost_usd * Decimal("0.5")
    assert batch_meta(redis_client, keys, batch_id)["status"] == "completed"


def test_parse_line_shapes() -> None:
    ok = parse_line({"custom_id": "a", "response": {"status_code": 200, "body": {
        "choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}}})
    assert ok is not None and ok.ok and ok.result is not None and ok.result["content"] == "hi"
    err500 = parse_line({"custom_id": "b", "response": {"status_code": 500, "body": {
        "error": {"message": "boom", "code": "server_error"}}}})
    assert err500 is not None and not err500.ok and err500.retryable
    err400 = parse_line({"custom_id": "c", "response": {"status_code": 400, "body": {
        "error": {"message": "bad", "code": "invalid"}}}})
    assert err400 is not None and not err400.retryable and err400.error_code == "invalid"
    expired = parse_line({"custom_id": "d", "response": None,
                          "error": {"code": "batch_expired", "message": "late"}})
    assert expired is not None and expired.retryable
    assert parse_line({"response": None}) is None


def test_callback_policy_is_no_open_relay() -> None:
    allowed = ["hooks.example.com", "*.corp.example", "127.0.0.1:9"]
    assert callback_refusal("https://hooks.example.com/x", allowed) is None
    assert callback_refusal("https://a.corp.example/x", allowed) is None
    assert callback_refusal("http://127.0.0.1:9/x", allowed) is None
    # Ports: 80 and 443 unless the entry names others (issue 16).
    assert callback_refusal("https://hooks.example.com:6379/x", allowed)
    assert callback_refusal("http://127.0.0.1/x", allowed)  # that entry allows port 9 only
    assert callback_refusal("http://a.corp.example:8080/x", ["*.corp.example:*"]) is None
    assert callback_refusal("http://[::1]:8080/x", ["[::1]:8080"]) is None
    assert callback_refusal("http://[::1]:8081/x", ["[::1]:8080"])
    assert callback_refusal("https://evil.example.net/", allowed)
    assert callback_refusal("http://10.0.0.5/", ["*"])  # private IP even with '*'
    assert callback_refusal("http://[::1]/", ["*"])
    assert callback_refusal("http://169.254.169.254/latest", ["*"])
    assert callback_refusal("https://hooks.example.com/x", [])  # no list, no callbacks
    assert sign(b"{}", "s", 1700000000).startswith("t=1700000000,v1=")


def test_openai_client_sees_simulator(sim_url: str) -> None:
    client = openai.OpenAI(base_url=sim_url, api_key="sk-x")
    assert client.batches.list(limit=1) is not None


def test_config_cli_sets_and_gets_flush_interval(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    import subprocess

    from hybrid_router.router.core.runtime_config import get_flush_interval
    from tests.support import REPO_ROOT, child_env, cli_argv

    settings = make_settings()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli_argv("config", *args), env=child_env(settings), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)

    done = cli("set", "flush-interval", "42.5")
    assert done.returncode == 0, done.stderr
    assert get_flush_interval(redis_client, settings) == 42.5
    shown = cli("get")
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["flush_interval_s"] == 42.5
    bad = cli("set", "flush-interval", "0")
    assert bad.returncode == 2 and "flush_interval_s" in bad.stderr
    assert get_flush_interval(redis_client, settings) == 42.5


def test_flush_escalates_a_request_whose_deadline_a_batch_would_miss(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native",
                             flush_interval_s=0.5, expected_batch_turnaround_s=5)
    keys = Keys(settings.key_prefix)
    late = submit_low(redis_client, settings, "deadline soon", deadline_s=8)
    easy = submit_low(redis_client, settings, "no deadline")
    assert record(redis_client, settings, late).route == "batch"
    assert redis_client.zscore(keys.batch_deadlines(), late) is not None
    # The worker now expects a slower batch round trip than the intake did.
    slower = settings.model_copy(update={"expected_batch_turnaround_s": 60.0})
    sent: list[str] = []
    report = flush(_ctx(slower, redis_client, dispatch_stream=sent.append))
    assert report.escalated == 1 and report.submitted == 1 and sent == [late]
    rec = record(redis_client, settings, late)
    assert (rec.status, rec.route) == ("dispatched", "stream") and "deadline" in rec.route_reason
    assert redis_client.zscore(keys.dispatched(), late) is not None
    assert redis_client.zscore(keys.batch_deadlines(), late) is None
    assert record(redis_client, settings, easy).status == "submitted"


def test_members_without_a_line_are_requeued_once(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    from types import SimpleNamespace

    settings = make_settings(upstream_base_url=sim_url, batch_mode="native",
                             batch_max_attempts=3)
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"lost {i}") for i in range(3)]
    batch_id = flush(_ctx(settings, redis_client)).batches[0]["batch_id"]
    ctx = PollContext(settings, redis_client, make_openai_client(settings))
    # A completed batch whose files hold no line for these requests.
    empty = SimpleNamespace(status="completed", output_file_id=None, error_file_id=None,
                            errors=None)
    first = write_back_batch(ctx, batch_id, "gpt-4o-mini", empty)
    assert first.requeued == 3
    second = write_back_batch(ctx, batch_id, "gpt-4o-mini", empty)
    assert second.requeued == 0 and second.unchanged == 3
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == ids
    for request_id in ids:
        rec = record(redis_client, settings, request_id)
        assert (rec.status, rec.attempts, rec.batch_id) == ("queued", 1, None)
        assert event_types(redis_client, settings, request_id)[-1] == "queued"


def test_poll_requeues_a_batch_the_upstream_lost(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    from hybrid_router.workers.batch.poll import poll
    from hybrid_router.workers.batch.record import mark_submitted, record_batch

    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"lost batch {i}") for i in range(2)]
    claim = batch_claim.claim(redis_client, keys, "gpt-4o-mini", 10)
    assert claim is not None
    record_batch(redis_client, settings, "batch_unknown_upstream", "gpt-4o-mini", "native", 2)
    assert mark_submitted(redis_client, settings, "batch_unknown_upstream", ids) == 2
    batch_claim.drop(redis_client, keys, claim.claim_id)
    report = poll(PollContext(settings, redis_client, make_openai_client(settings)))
    assert report.finished == ["batch_unknown_upstream"] and report.writeback.requeued == 2
    assert redis_client.zcard(keys.batches_in_flight()) == 0
    assert _ids(redis_client, keys.pending("gpt-4o-mini")) == ids
    assert all(record(redis_client, settings, i).status == "queued" for i in ids)


def test_a_batch_failed_as_a_whole_is_split_and_only_a_lone_failure_uses_an_attempt(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """Write-back of a batch that failed as a whole (no line ran): several requests go back
    without using an attempt, in two halves the next flush sends apart; a failed batch of one
    uses an attempt, and that request is then always sent alone. Queued requests with a
    deadline are in the deadlines index, submitted ones are not."""
    from types import SimpleNamespace

    settings = make_settings(upstream_base_url=sim_url, batch_mode="native",
                             batch_max_attempts=3)
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"split {i}", deadline_s=86_400.0)
           for i in range(5)]
    assert redis_client.zcard(keys.batch_deadlines()) == 5
    ctx = PollContext(settings, redis_client, make_openai_client(settings))
    failed = SimpleNamespace(status="failed", output_file_id=None, error_file_id=None,
                             errors=SimpleNamespace(data=[SimpleNamespace(
                                 code="invalid_request", message="line 3 is bad")]))

    def flushed() -> list[set[str]]:
        batches = flush(_ctx(settings, redis_client)).batches
        return [{m.decode() for m in redis_client.smembers(keys.batch_requests(b["batch_id"]))}
                for b in batches]

    def fail(members: set[str]) -> None:
        batch_id = record(redis_client, settings, next(iter(members))).batch_id
        assert batch_id is not None
        report = write_back_batch(ctx, batch_id, "gpt-4o-mini", failed)
        assert report.requeued == len(members) and report.failed == 0

    [everyone] = flushed()
    assert everyone == set(ids) and redis_client.zcard(keys.batch_deadlines()) == 0
    fail(everyone)
    assert all(record(redis_client, settings, i).attempts == 0 for i in ids)
    assert redis_client.zcard(keys.batch_deadlines()) == 5  # queued again: indexed again
    halves = flushed()
    assert sorted(len(h) for h in halves) == [2, 3] and set().union(*halves) == set(ids)
    pair = min(halves, key=len)
    fail(pair)
    lone = flushed()
    assert {frozenset(b) for b in lone} == {frozenset({i}) for i in pair}
    culprit = next(iter(lone[0]))
    fail({culprit})
    rec = record(redis_client, settings, culprit)
    assert (rec.status, rec.attempts) == ("queued", 1)
    assert "invalid_request: line 3 is bad" in str(
        RequestStore(redis_client, settings).events_after(culprit)[-1])
    fresh = submit_low(redis_client, settings, "fresh")
    assert {frozenset(b) for b in flushed()} == {frozenset({culprit}), frozenset({fresh})}


def test_an_id_queued_twice_is_sent_once_so_the_file_stays_valid(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, sim_url: str) -> None:
    """A custom_id twice in one file fails the whole batch upstream (`duplicate_custom_id`):
    the flush sends each id once, whatever its queue holds."""
    settings = make_settings(upstream_base_url=sim_url, batch_mode="native")
    keys = Keys(settings.key_prefix)
    ids = [submit_low(redis_client, settings, f"twice {i}") for i in range(2)]
    redis_client.rpush(keys.pending("gpt-4o-mini"), ids[0])
    report = flush(_ctx(settings, redis_client))
    assert len(report.batches) == 1 and report.batches[0]["requests"] == 2
    _written_back(settings, redis_client, report.batches[0]["batch_id"])
    assert [record(redis_client, settings, i).status for i in ids] == ["completed"] * 2
