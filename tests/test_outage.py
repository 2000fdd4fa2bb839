"""Upstream outage: high requests fail fast with a clear, retryable error; low requests wait.

The upstream is a private simulator on a fixed port that starts *down* (nothing listens). High
requests use their retry budget and end ``failed`` with ``upstream_unavailable`` (retryable)
within seconds; every batch flush fails, puts its claim back, and leaves the low requests
``queued`` — none lost, none failed. Then the simulator starts on the same port and every low
request completes with exactly the simulator's deterministic answer, each sent upstream once.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import running_simulator, sim_stats
from tests.support import Stack, free_port, start_redis_server, wait_until

TERMINAL = ("completed", "failed", "cancelled")


def view(api: str, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/v1/requests/{request_id}", timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def wait_terminal(api: str, request_id: str, timeout: float, message: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        record = view(api, request_id)
        return record if record["status"] in TERMINAL else None

    return wait_until(finished, timeout, message=message)


def submit(api: str, content: str, priority: str) -> str:
    response = httpx.post(f"{api}/v1/requests", timeout=10, json={
        "priority": priority, "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_outage_fails_high_fast_keeps_low_queued_and_recovers(
    make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack]
) -> None:
    port = free_port()
    upstream = f"http://127.0.0.1:{port}/v1"
    settings = make_settings(
        upstream_base_url=upstream, upstream_timeout_s=5, batch_mode="native",
        stream_max_retries=2, retry_backoff_base_s=0.1, retry_backoff_max_s=0.3,
        flush_interval_s=1.0, poll_interval_s=0.5,
    )
    keys = Keys(settings.key_prefix)
    stack = stack_factory(settings)
    api = stack.start_api()
    stack.start_worker("stream", concurrency=8)
    stack.start_worker("batch")
    stack.start_beat()
    client = redis.Redis.from_url(settings.redis_url)
    tag = uuid.uuid4().hex[:8]

    # High: the retry budget, then a clear retryable failure, quickly.
    started = time.monotonic()
    high = [submit(api, f"outage high {tag} {i}", "high") for i in range(5)]
    finals = [wait_terminal(api, rid, 20, "high request failed") for rid in high]
    failed_after = time.monotonic() - started
    for final in finals:
        assert final["status"] == "failed", final
        assert final["error"]["code"] == "upstream_unavailable", final["error"]
        assert final["error"]["retryable"] is True
        assert final["result"] is None
    assert failed_after < 15, f"high requests took {failed_after:.1f}s to fail"
    with httpx.stream("GET", f"{api}/v1/requests/{high[0]}/events", timeout=10) as events:
        body = events.read().decode()
    assert "event: error" in body and "upstream_unavailable" in body

    # Low: every flush fails and puts its claim back; nothing is lost or failed.
    low_prompts = [f"outage low {tag} {i}" for i in range(10)]
    low = [submit(api, content, "low") for content in low_prompts]
    last_flush = keys.last_flush()
    def failed_flush_at() -> float | None:
        flush = client.hgetall(last_flush)
        return float(flush[b"at"]) if flush.get(b"error") else None

    first_error_at: float = wait_until(failed_flush_at, 20,
                                       message="a flush that failed on the outage")
    wait_until(lambda: (failed_flush_at() or 0.0) > first_error_at, 20,
               message="a second failed flush")
    statuses = {view(api, rid)["status"] for rid in low}
    assert statuses == {"queued"}, statuses
    # Between two flushes every request is back in its queue and no claim is left; while a
    # flush attempt holds its claim (the upload being refused), the queue is briefly empty.
    def back_in_queue() -> bool:
        pipe = client.pipeline(transaction=True)
        pipe.llen(keys.pending("gpt-4o-mini")).zcard(keys.claims())
        pending, claims = pipe.execute()
        return bool(pending == len(low) and claims == 0)

    wait_until(back_in_queue, 20, message="every low request back in the queue, no claim left")

    # The upstream comes back on the same address: every low request completes, once.
    with running_simulator(port=port, batch_turnaround_s=0.5, ttft_s=0.0) as sim:
        assert sim == upstream
        done = [wait_terminal(api, rid, 45, "low request finished after the outage")
                for rid in low]
        for record in done:
            assert record["status"] == "completed", record
        hashes = [prompt_hash([{"role": "user", "content": c}]) for c in low_prompts]
        calls = [sim_stats(sim, h)["requests"] for h in hashes]
        batch_lines = sim_stats(sim)["totals"].get("batch_lines", 0)
        assert batch_lines == len(low), f"{batch_lines} batch lines for {len(low)} requests"
        assert all(c == 0 for c in calls), "low requests must go through the batch, not chat"
        sdk = openai.OpenAI(base_url=sim, api_key="sk-sim")
        for content, record in zip(low_prompts, done, strict=True):
            expected = sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": content}])
            assert record["result"]["content"] == expected.choices[0].message.content

        # And the stream lane works again too.
        again = submit(api, f"after outage {tag}", "high")
        final = wait_terminal(api, again, 20, "high request after recovery")
        assert final["status"] == "completed", final
    client.close()


def test_redis_outage_answers_503_and_recovers_on_its_own(
    make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
    tmp_path: Path,
) -> None:
    """Redis gone: the API says so with a retryable 503 (not a 500), readiness fails, and the
    same processes serve again once Redis is back on its address, with nothing lost."""
    store, url = start_redis_server(tmp_path, appendonly=True,
                                    extra_args=("--appendfsync", "always"))
    port = int(url.rsplit(":", 1)[1])
    try:
        settings = make_settings(redis_url=f"{url}/0", upstream_base_url="http://127.0.0.1:9/v1")
        stack = stack_factory(settings)
        api = stack.start_api()
        before = submit(api, "before the redis outage", "low")

        store.kill(signal.SIGKILL)
        assert store.proc is not None
        store.proc.wait(10)
        for method, path, body in (
            ("POST", "/v1/requests", {"priority": "low",
                                      "messages": [{"role": "user", "content": "during"}]}),
            ("GET", f"/v1/requests/{before}", None),
            ("DELETE", f"/v1/requests/{before}", None),
        ):
            response = httpx.request(method, f"{api}{path}", json=body, timeout=30)
            assert response.status_code == 503, f"{method} {path}: {response.text[:300]}"
            assert response.headers.get("retry-after"), "a 503 says when to come back"
            error = response.json()["error"]
            assert error["code"] == "store_unavailable", error
        assert httpx.get(f"{api}/readyz", timeout=10).status_code == 503

        store, _ = start_redis_server(tmp_path, appendonly=True, port=port,
                                      extra_args=("--appendfsync", "always"))
        wait_until(lambda: httpx.get(f"{api}/readyz", timeout=5).status_code == 200, 20,
                   message="API ready again")
        assert view(api, before)["status"] == "queued", "the accepted request survived"
        after = submit(api, "after the redis outage", "low")
        assert view(api, after)["status"] == "queued"
    finally:
        store.stop()


def test_a_batch_worker_keeps_running_when_redis_dies_under_a_running_task(
        tmp_path: Path, sim_url: str, make_settings: Callable[..., Settings]) -> None:
    """Redis is SIGKILLed while the batch worker runs a task (an emulated batch of slow
    calls, acknowledged late): the worker must reconnect and take new work, not exit (a kombu
    defect made it exit: `hybrid_router.router.core.broker_transport`). (The interrupted batch itself is sent to
    a runner again once its heartbeat is stale, after a minute or more: tested elsewhere.)"""
    redis_proc, url = start_redis_server(tmp_path, appendonly=True,
                                         extra_args=("--appendfsync", "always"))
    port = int(url.rsplit(":", 1)[1])
    procs = {"redis": redis_proc}
    settings = make_settings(redis_url=f"{url}/0", upstream_base_url=sim_url,
                             batch_mode="emulated", flush_interval_s=0.5, poll_interval_s=0.5)
    try:
        with Stack(settings) as stack:
            api = stack.start_api(timeout=60)
            worker = stack.start_worker("batch", timeout=60)
            stack.start_beat()
            ids = [submit(api, f"slow batch line {uuid.uuid4().hex} [[sim:ttft=4]]", "low")
                   for _ in range(4)]
            client = redis.Redis.from_url(settings.redis_url)
            keys = Keys(settings.key_prefix)
            wait_until(lambda: all(client.hget(keys.record(i), "status") == b"submitted"
                                   for i in ids), 20, message="the emulated batch is running")
            client.close()
            for _ in range(2):  # twice: the first may hit the worker between tasks
                procs["redis"].kill(signal.SIGKILL)
                assert procs["redis"].proc is not None
                procs["redis"].proc.wait(10)
                procs["redis"], _ = start_redis_server(tmp_path, appendonly=True, port=port,
                                                       extra_args=("--appendfsync", "always"))
                time.sleep(1.0)  # the worker reconnects (or, with the defect, exits)
                assert worker.alive(), f"batch worker exited:\n{worker.output()[-3000:]}"
            after = [submit(api, f"after the restarts {uuid.uuid4().hex}", "low")
                     for _ in range(2)]
            for request_id in after:
                record = wait_terminal(api, request_id, 60, "a new low request completed")
                assert record["status"] == "completed", record
            assert worker.alive(), f"batch worker exited:\n{worker.output()[-3000:]}"
    finally:
        procs["redis"].stop()
