"""Celery and Flower tell the truth about streams: a live stack (API, Flower, a stream worker
started with Celery's own ``celery -A hybrid_router.workers.celery_app worker -Q <stream queue>``, real
Redis, the simulator), read through Flower's HTTP API and the ``celery`` command line.

One stack serves the module; each test uses its own prompts, so simulator counters never mix.
The first test needs the queue without a worker, so the worker starts inside it.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_stats
from tests.support import ManagedProcess, Stack, celery_argv, child_env, wait_until

MODEL = "gpt-4o-mini"
KEY = "sk-celery-truth"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONCURRENCY = 3


@pytest.fixture(scope="module")
def stack(redis_base_url: str, sim_url: str) -> Iterator[Stack]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
        api_keys={KEY: "tenant-a"}, stream_worker_concurrency=CONCURRENCY,
        retry_backoff_base_s=0.02, retry_backoff_max_s=0.2, log_format="json")
    with Stack(settings) as running:
        running.start_api(timeout=60)
        yield running


@pytest.fixture(scope="module")
def flower(stack: Stack) -> str:
    return stack.start_flower(timeout=60)


@pytest.fixture(scope="module")
def worker(stack: Stack) -> tuple[ManagedProcess, str]:
    """The stream lane as Celery users start it: ``celery ... worker -Q <stream queue>``."""
    queue = Keys(stack.settings.key_prefix).stream_queue()
    return stack.start_celery_worker("-Q", queue, "-c", "1", "--loglevel", "INFO", timeout=60)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers=AUTH, timeout=20) as client:
        yield client


def messages(directive: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Celery truth {uuid.uuid4().hex} {directive}"}]


def submit(http: httpx.Client, msgs: list[dict[str, str]]) -> str:
    r = http.post("/v1/requests", json={"model": MODEL, "messages": msgs, "priority": "high"})
    assert r.status_code == 202, r.text
    request_id: str = r.json()["id"]
    return request_id


def record(http: httpx.Client, request_id: str) -> dict[str, Any]:
    r = http.get(f"/v1/requests/{request_id}")
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def status_is(http: httpx.Client, request_id: str, *statuses: str) -> bool:
    return record(http, request_id)["status"] in statuses


def events_of(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(stack.settings.redis_url)
    try:
        return RequestStore(client, stack.settings).events_after(request_id)
    finally:
        client.close()


def flower_task(flower: str, task_id: str) -> dict[str, Any]:
    r = httpx.get(f"{flower}/api/task/info/{task_id}", timeout=5)
    if r.status_code != 200:
        return {}
    found: dict[str, Any] = r.json()
    return found


def flower_state(flower: str, task_id: str, state: str, timeout: float = 15) -> dict[str, Any]:
    return wait_until(lambda: (t := flower_task(flower, task_id)).get("state") == state and t,
                      timeout, 0.2, message=f"Flower shows {task_id} {state}")


def celery_cli(stack: Stack, *args: str) -> str:
    """Run ``celery -A hybrid_router.workers.celery_app <args>`` with the stack's settings; its stdout."""
    done = subprocess.run(celery_argv(*args), env=child_env(stack.settings), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def streaming_tokens(stack: Stack, request_id: str, count: int) -> bool:
    return sum(1 for e in events_of(stack, request_id) if e["type"] == "token") >= count


def assert_cancelled_once(stack: Stack, http: httpx.Client, request_id: str) -> dict[str, Any]:
    found = wait_until(lambda: (rec := record(http, request_id))["status"] == "cancelled" and rec,
                       5, message=f"{request_id} cancelled")
    kinds = [e["type"] for e in events_of(stack, request_id)]
    assert kinds.count("cancelled") == 1 and kinds[-1] == "cancelled"
    assert "done" not in kinds and "error" not in kinds
    return found


def test_a_queued_backlog_is_visible_then_taken(stack: Stack, flower: str, http: httpx.Client,
                                                request: pytest.FixtureRequest) -> None:
    """Messages the intake writes (no worker yet) are `task-sent` in Flower: PENDING, named
    and with their request id as task id; a worker taking them sends `task-received`."""
    ids = [submit(http, messages()) for _ in range(3)]
    for request_id in ids:
        task = flower_state(flower, request_id, "PENDING")
        assert task["name"] == "hr.stream.run" and request_id in task["args"]
        assert task["received"] is None
        assert status_is(http, request_id, "dispatched")
    request.getfixturevalue("worker")
    for request_id in ids:
        task = flower_state(flower, request_id, "SUCCESS", timeout=30)
        assert task["received"] and task["started"] and task["sent"]
        assert task["worker"].startswith("celery-")
        assert status_is(http, request_id, "completed")


def test_flower_state_matches_each_request_outcome(
        stack: Stack, flower: str, worker: tuple[ManagedProcess, str], http: httpx.Client,
        sim_url: str) -> None:
    completed = submit(http, messages())
    failed = submit(http, messages("[[sim:fail=400]]"))
    cancelled = submit(http, messages("[[sim:tps=10,tokens=200]]"))
    wait_until(lambda: streaming_tokens(stack, cancelled, 2), 15, message="tokens streamed")
    assert http.delete(f"/v1/requests/{cancelled}").status_code == 200

    assert flower_state(flower, completed, "SUCCESS")["result"] == "'completed'"
    assert status_is(http, completed, "completed")

    task = flower_state(flower, failed, "FAILURE")
    error = record(http, failed)["error"]
    assert error["code"] == "upstream_400"
    assert error["code"] in task["exception"] and error["message"] in task["exception"]

    flower_state(flower, cancelled, "REVOKED")
    assert_cancelled_once(stack, http, cancelled)
    # Every id Flower lists is a request id the API answers for.
    listed = httpx.get(f"{flower}/api/tasks", params={"taskname": "hr.stream.run"},
                       timeout=5).json()
    assert {completed, failed, cancelled} <= set(listed)
    for task_id in listed:
        record(http, task_id)


def test_inspect_active_lists_running_streams_and_revoke_terminate_stops_them(
        stack: Stack, flower: str, worker: tuple[ManagedProcess, str], http: httpx.Client,
        sim_url: str) -> None:
    _proc, node = worker
    slow = "[[sim:tps=0.4,tokens=400]]"  # a token every 2.5 s: only an abort stops it in 1 s
    by_cli, by_flower = messages(slow), messages(slow)
    first, second = submit(http, by_cli), submit(http, by_flower)
    for request_id in (first, second):
        wait_until(lambda rid=request_id: streaming_tokens(stack, rid, 1), 15,
                   message="streaming")

    active = json.loads(celery_cli(stack, "inspect", "active", "--json", "-d", node))
    running = {task["id"]: task for task in active[node]}
    assert {first, second} <= set(running)
    assert running[first]["name"] == "hr.stream.run" and running[first]["args"] == [first]

    # Celery's command line spells ``revoke(id, terminate=True)`` as ``control terminate``.
    celery_cli(stack, "control", "terminate", "SIGTERM", first, "-d", node)
    wait_until(lambda: sim_stats(sim_url, prompt_hash(by_cli))["streams_aborted"] == 1, 1.0,
               0.02, message="upstream call stopped within 1 s of `celery control terminate`")
    cancelled = assert_cancelled_once(stack, http, first)
    assert status_is(http, second, "streaming")

    revoked = httpx.post(f"{flower}/api/task/revoke/{second}", params={"terminate": "true"},
                         timeout=5)
    assert revoked.status_code == 200, revoked.text
    started = time.monotonic()
    wait_until(lambda: sim_stats(sim_url, prompt_hash(by_flower))["streams_aborted"] == 1, 1.0,
               0.02, message="upstream call stopped within 1 s of Flower's revoke")
    assert time.monotonic() - started < 1.0
    assert_cancelled_once(stack, http, second)
    for request_id in (first, second):
        flower_state(flower, request_id, "REVOKED")
    # The tokens paid for are on the record, as after a DELETE.
    paid = wait_until(lambda: record(http, first)["usage"], 5, message="paid tokens recorded")
    relayed = sum(1 for e in events_of(stack, first) if e["type"] == "token")
    assert cancelled["status"] == "cancelled" and relayed <= paid["completion_tokens"] < 400
    after = json.loads(celery_cli(stack, "inspect", "active", "--json", "-d", node))
    assert not {first, second} & {task["id"] for task in after[node]}


def test_revoking_a_queued_stream_cancels_it_before_it_starts(
        stack: Stack, flower: str, worker: tuple[ManagedProcess, str], http: httpx.Client,
        sim_url: str) -> None:
    _proc, node = worker
    blockers = [submit(http, messages("[[sim:tps=4,tokens=400]]")) for _ in range(CONCURRENCY)]
    for request_id in blockers:
        wait_until(lambda rid=request_id: status_is(http, rid, "streaming"), 15,
                   message="every slot of the worker busy")
    queued_msgs = messages()
    queued = submit(http, queued_msgs)
    flower_state(flower, queued, "PENDING")
    celery_cli(stack, "control", "revoke", queued, "-d", node)
    assert status_is(http, queued, "dispatched")  # still waiting for a slot
    for request_id in blockers:
        assert http.delete(f"/v1/requests/{request_id}").status_code == 200
    assert_cancelled_once(stack, http, queued)
    flower_state(flower, queued, "REVOKED")
    assert sim_stats(sim_url, prompt_hash(queued_msgs))["requests"] == 0


def test_a_plain_celery_worker_runs_the_stream_lane(
        stack: Stack, worker: tuple[ManagedProcess, str]) -> None:
    """``celery ... worker -Q <stream queue>`` is the stream lane: the engine takes the stream
    queue, Celery's consumer the control queue, and it logs structlog JSON lines."""
    proc, node = worker
    keys = Keys(stack.settings.key_prefix)
    queues = json.loads(celery_cli(stack, "inspect", "active_queues", "--json", "-d", node))
    assert [q["name"] for q in queues[node]] == [keys.stream_control_queue()]
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    assert any(line["event"] == "stream engine consuming" and line["queue"] == keys.stream_queue()
               for line in lines)
    assert any("ready" in line["event"] for line in lines)  # Celery's own lines, as JSON


@pytest.mark.long
@pytest.mark.timeout(480)
def test_streams_are_what_flower_shows_in_five_minutes(redis_base_url: str, sim_url: str) -> None:
    """Five minutes of normal use with the default intervals (flush 60 s, poll 30 s): 10
    streams, every process of the lane running; at least half the tasks Flower lists are
    streams (housekeeping that found nothing to do is not sent). Needs the stream sweep out of
    beat (issue 15, the engines sweep)."""
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
        api_keys={KEY: "tenant-a"}, log_format="json")
    with Stack(settings) as running, httpx.Client(headers=AUTH, timeout=20) as client:
        api = running.start_api(timeout=60)
        flower = running.start_flower(timeout=60)
        running.start_worker("stream", timeout=60)
        running.start_worker("batch", timeout=60)
        running.start_beat()
        started = time.monotonic()
        ids = []
        for i in range(10):
            wait_until(lambda n=i: time.monotonic() - started >= n * 29, 60, 0.5,
                       message="the next stream's turn")
            r = client.post(f"{api}/v1/requests", json={
                "model": MODEL, "priority": "high", "messages": messages("[[sim:tps=20]]")})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        wait_until(lambda: time.monotonic() - started >= 300, 60, 1, message="five minutes")
        tasks = httpx.get(f"{flower}/api/tasks", timeout=10).json()
        names = [task["name"] for task in tasks.values()]
        streams = names.count("hr.stream.run")
        assert set(ids) <= set(tasks)
        assert streams >= len(names) / 2, sorted(names)
