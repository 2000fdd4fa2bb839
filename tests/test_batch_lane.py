"""The batch lane end to end: real Redis, a real Celery batch worker and beat (subprocesses),
the simulator over HTTP, the intake API over HTTP where the test is about it."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from tests.batch_helpers import create_low_bulk, event_types, record, submit_low
from tests.callback_receiver import CallbackReceiver, callback_receiver
from tests.support import Stack, wait_until

FAST = {"flush_interval_s": 0.5, "poll_interval_s": 0.3, "batch_max_attempts": 2,
        "batch_mode": "native", "retry_backoff_base_s": 0.1, "retry_backoff_max_s": 0.5,
        "batch_lock_ttl_s": 2.0}


def direct_answer(sim_url: str, model: str, content: str) -> str:
    """The simulator's own non-streamed answer to the same prompt (openai SDK)."""
    client = openai.OpenAI(base_url=sim_url, api_key="sk-direct")
    reply = client.chat.completions.create(model=model,
                                           messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content or ""


def all_terminal(client: redis.Redis, settings: Settings, ids: list[str]) -> bool:
    return all(record(client, settings, i).terminal for i in ids)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    """Answers 500 to the first POST of each request, then 200."""
    with callback_receiver(fail_first=True) as r:
        yield r


def test_two_models_become_two_batches_with_own_results_and_callbacks(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, sim_url: str, receiver: CallbackReceiver) -> None:
    settings = make_settings(upstream_base_url=sim_url, callback_allowed_hosts=["127.0.0.1:*"],
                             callback_secret="s3cret", **FAST)
    prompts = {("gpt-4o-mini" if i % 2 else "gpt-4o", f"two models {i} {time.time()}")
               for i in range(12)}
    ids: dict[str, tuple[str, str]] = {}
    for n, (model, content) in enumerate(sorted(prompts)):
        extra = {"callback_url": receiver.url(str(n))} if n < 3 else {}
        ids[submit_low(redis_client, settings, content, model, **extra)] = (model, content)
    stack = stack_factory(settings)
    stack.start_worker("batch")
    stack.start_beat()
    wait_until(lambda: all_terminal(redis_client, settings, list(ids)), 30, 0.1,
               message="every request terminal")
    batches: dict[str, set[str]] = {}
    for request_id, (model, content) in ids.items():
        rec = record(redis_client, settings, request_id)
        assert rec.status == "completed", (rec.status, rec.error)
        assert rec.result is not None and rec.result.content == direct_answer(sim_url, model,
                                                                              content)
        assert rec.cost_usd is not None and rec.cost_usd > 0
        assert event_types(redis_client, settings, request_id) == [
            "accepted", "queued", "submitted", "done"]
        assert rec.batch_id is not None
        batches.setdefault(rec.batch_id, set()).add(model)
    assert len(batches) == 2 and all(len(models) == 1 for models in batches.values())
    keys = Keys(settings.key_prefix)
    ledger = Ledger.from_hash(redis_client.hgetall(keys.ledger())).total("batch")
    assert ledger.requests == 12 and ledger.savings_usd == ledger.cost_usd
    # Callbacks: one delivered POST each (after one 500), signed with the secret.
    wait_until(lambda: len(receiver.posts) == 3, 20, 0.1, message="3 callbacks delivered")
    time.sleep(0)  # the receiver thread appended; check what it got
    for post in receiver.posts:
        data = post.data
        assert data["status"] == "completed" and data["result"]["content"]
        assert "tenant" not in data and "body" not in data
        assert post.signature is not None
        stamp, _, digest = post.signature.partition(",v1=")
        signed = stamp.removeprefix("t=").encode() + b"." + post.body
        assert digest == hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()
    assert len({post.data["id"] for post in receiver.posts}) == 3


def test_line_errors_expired_and_failed_batches_end_in_the_right_state(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, **FAST)
    tag = time.time()
    # One model per scenario, so each scenario is its own batch.
    line = [submit_low(redis_client, settings,
                       f"line {i} {tag}" + (" [[sim:line_error=1]]" if i < 2 else ""),
                       "gpt-4o-mini") for i in range(5)]
    expire = [submit_low(redis_client, settings,
                         f"expire {i} {tag}" + (" [[sim:batch=expire]]" if i == 7 else ""),
                         "gpt-4.1-mini") for i in range(8)]
    fail = [submit_low(redis_client, settings,
                       f"fail {i} {tag}" + (" [[sim:batch=fail]]" if i == 0 else ""), "gpt-4.1")
            for i in range(3)]
    stack = stack_factory(settings)
    stack.start_worker("batch")
    stack.start_beat()
    everyone = line + expire + fail
    wait_until(lambda: all_terminal(redis_client, settings, everyone), 45, 0.1,
               message="every request terminal")

    def requeued_then_failed(request_id: str, code: str) -> None:
        rec = record(redis_client, settings, request_id)
        assert rec.status == "failed" and rec.attempts == 2, (rec.status, rec.attempts)
        assert rec.error is not None and rec.error.code == code, rec.error
        assert event_types(redis_client, settings, request_id) == [
            "accepted", "queued", "submitted", "queued", "submitted", "error"]

    for i, request_id in enumerate(line):
        if i < 2:
            requeued_then_failed(request_id, "server_error")
        else:
            assert record(redis_client, settings, request_id).status == "completed"
    # Expired: half of each try completes (partial results kept), the rest goes again.
    states = [record(redis_client, settings, i).status for i in expire]
    assert states[:4] == ["completed"] * 4, states
    assert "failed" in states[4:] and "completed" in states[4:], states
    for request_id in expire:
        rec = record(redis_client, settings, request_id)
        if rec.status == "failed":
            requeued_then_failed(request_id, "batch_expired")
        else:
            assert rec.result is not None and rec.result.content
    # Failed as a whole: split until the line at fault is alone; only it uses attempts.
    rec = record(redis_client, settings, fail[0])
    assert rec.status == "failed" and rec.attempts == 2, (rec.status, rec.attempts)
    assert rec.error is not None and rec.error.code == "simulated_validation_failure"
    for request_id in fail[1:]:
        rec = record(redis_client, settings, request_id)
        assert rec.status == "completed" and rec.attempts == 0, (rec.status, rec.attempts)
    keys = Keys(settings.key_prefix)
    assert redis_client.zcard(keys.batches_in_flight()) == 0
    completed = sum(record(redis_client, settings, i).status == "completed" for i in everyone)
    ledger = Ledger.from_hash(redis_client.hgetall(keys.ledger())).total("batch")
    assert ledger.requests == completed


def test_killed_worker_loses_and_duplicates_nothing(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, **FAST)
    ids = [submit_low(redis_client, settings, f"kill {i} {time.time()} [[sim:turnaround=2]]")
           for i in range(6)]
    stack = stack_factory(settings)
    worker = stack.start_worker("batch")
    stack.start_beat()
    wait_until(lambda: all(record(redis_client, settings, i).status == "submitted" for i in ids),
               15, 0.05, message="submitted")
    worker.kill()  # SIGKILL to the whole process group, while the batch is in flight
    stack.start_worker("batch")
    wait_until(lambda: all_terminal(redis_client, settings, ids), 30, 0.1, message="terminal")
    for request_id in ids:
        assert record(redis_client, settings, request_id).status == "completed"
        assert event_types(redis_client, settings, request_id).count("done") == 1
    ledger = Ledger.from_hash(redis_client.hgetall(Keys(settings.key_prefix).ledger()))
    assert ledger.total("batch").requests == 6


def test_runtime_flush_interval_and_admin_api(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url,
                             api_keys={"k-admin": "admin", "k-user": "alice"},
                             expected_batch_turnaround_s=5.0, **FAST)
    stack = stack_factory(settings)
    api = stack.start_api()
    admin = httpx.Client(base_url=api, headers={"Authorization": "Bearer k-admin"}, timeout=10)
    user = httpx.Client(base_url=api, headers={"Authorization": "Bearer k-user"}, timeout=10)
    assert user.put("/v1/admin/config", json={"flush_interval_s": 1}).status_code == 403
    assert user.post("/v1/admin/flush").status_code == 403
    bad = admin.put("/v1/admin/config", json={"flush_interval_s": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "flush_interval_s"
    assert admin.put("/v1/admin/config", json={"flush_interval_s": 3600}).status_code == 200
    refused = user.post("/v1/requests", json={
        "priority": "low", "messages": [{"role": "user", "content": "x"}],
        "callback_url": "http://10.1.2.3/hook"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "callback_url"
    stack.start_worker("batch")
    stack.start_beat()

    def submit(content: str, **extra: Any) -> str:
        r = user.post("/v1/requests", json={"priority": "low", "model": "gpt-4o-mini",
                                            "messages": [{"role": "user", "content": content}],
                                            **extra})
        assert r.status_code == 202, r.text
        assert r.json()["route"] == "batch"  # accepted for the batch lane
        return str(r.json()["id"])

    first = submit(f"runtime a {time.time()}")
    # Beat ticks every second; with the 3600 s interval nothing may flush for a few ticks.
    time.sleep(2.5)
    assert record(redis_client, settings, first).status == "queued"
    assert not redis_client.exists(Keys(settings.key_prefix).last_flush())
    assert admin.post("/v1/admin/flush").status_code == 202
    wait_until(lambda: record(redis_client, settings, first).status != "queued", 10, 0.05,
               message="flush on demand")
    second = submit(f"runtime b {time.time()}")
    # The API classifies with the runtime interval: a deadline of 8 s cannot wait 3600 s.
    direct = user.post("/v1/requests", json={
        "priority": "low", "deadline_s": 8, "messages": [{"role": "user", "content": "now"}]})
    assert direct.json()["route"] == "stream"
    # A request accepted on the configured 0.5 s interval (direct enqueue, as before a change)
    # is escalated by the poll once the next flush plus 5 s turnaround would miss its deadline.
    late = submit_low(redis_client, settings, f"runtime deadline {time.time()}", deadline_s=8)
    assert record(redis_client, settings, late).status in ("queued", "dispatched")
    wait_until(lambda: record(redis_client, settings, late).route == "stream", 10, 0.05,
               message="deadline escalation by the poll")
    escalated = record(redis_client, settings, late)
    assert escalated.status in ("dispatched", "streaming", "completed")
    assert "deadline" in escalated.route_reason
    time.sleep(1.5)
    assert record(redis_client, settings, second).status == "queued"
    view = admin.put("/v1/admin/config", json={"flush_interval_s": 0.5}).json()
    assert view["flush_interval_s"] == 0.5
    assert admin.get("/v1/admin/config").json()["flush_interval_s"] == 0.5
    wait_until(lambda: record(redis_client, settings, second).status == "completed", 10, 0.05,
               message="flush after the interval was shortened")


def test_emulated_mode_auto_detected(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis) -> None:
    from hybrid_router.simulator.testing import running_simulator

    with running_simulator(batch_api=False) as url:
        settings = make_settings(upstream_base_url=url, **{**FAST, "batch_mode": "auto"})
        prompts = [f"emulated {i} {time.time()}" for i in range(6)]
        ids = [submit_low(redis_client, settings, p) for p in prompts]
        stack = stack_factory(settings)
        stack.start_worker("batch")
        stack.start_beat()
        wait_until(lambda: all_terminal(redis_client, settings, ids), 30, 0.1,
                   message="terminal")
        for request_id, prompt in zip(ids, prompts, strict=True):
            rec = record(redis_client, settings, request_id)
            assert rec.status == "completed", rec.error
            assert rec.result is not None
            assert rec.result.content == direct_answer(url, "gpt-4o-mini", prompt)
            assert rec.batch_id is not None and rec.batch_id.startswith("emu_")
        keys = Keys(settings.key_prefix)
        assert redis_client.get(keys.batch_mode()) == b"emulated"
        ledger = Ledger.from_hash(redis_client.hgetall(keys.ledger())).total("batch")
        assert ledger.requests == 6 and ledger.savings_usd == 0 and ledger.cost_usd > 0


def test_worker_sigkilled_mid_flush_loses_and_duplicates_nothing(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, sim_url: str) -> None:
    settings = make_settings(upstream_base_url=sim_url, **{**FAST, "flush_interval_s": 1.0})
    keys = Keys(settings.key_prefix)
    ids = create_low_bulk(redis_client, settings,
                          [f"mid-flush {i} {time.time()}" for i in range(4000)])
    stack = stack_factory(settings)
    worker = stack.start_worker("batch")
    stack.start_beat()
    # The moment a flush holds a claim, SIGKILL the worker's whole process group.
    wait_until(lambda: redis_client.zcard(keys.claims()) > 0, 15, 0.002, message="a claim")
    worker.kill()
    assert redis_client.zcard(keys.claims()) == 1  # the dead flush's claim is left behind
    stack.start_worker("batch")
    wait_until(lambda: redis_client.zcard(keys.claims()) == 0, 15, 0.05,
               message="orphaned claim recovered")

    def finished() -> bool:
        statuses = batch_claim.fetch_rows(redis_client, keys, ids)
        return all(row.status == "completed" for row in statuses)

    wait_until(finished, 60, 0.2, message="every request completed")
    pipe = redis_client.pipeline(transaction=False)
    for request_id in ids:
        pipe.get(keys.seq(request_id))
    # accepted, queued, submitted, done: one each (a requeue would add queued + submitted).
    seqs = [int(x) for x in pipe.execute()]
    assert all(s in (4, 6) for s in seqs), sorted(set(seqs))
    for request_id in ids[:50] + ids[-50:]:
        assert event_types(redis_client, settings, request_id).count("done") == 1
    ledger = Ledger.from_hash(redis_client.hgetall(keys.ledger())).total("batch")
    assert ledger.requests == len(ids)
