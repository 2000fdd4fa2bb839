"""Operator verbs through the real CLI (subprocesses): `status`, `submit`, `tail`.

Errors must be one line without a traceback, and exit codes must mean something:
0 completed, 1 failed / unreachable / gave up waiting, 2 bad usage or refused (4xx).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from hybrid_router.router.client import enqueue
from hybrid_router.settings import Settings
from tests.support import (
    REPO_ROOT,
    ManagedProcess,
    Stack,
    child_env,
    cli_argv,
    free_port,
    wait_until,
)

MSG = [{"role": "user", "content": "hello ops"}]


def run_cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(*args), env=child_env(settings), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("hybrid-router:")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in error_lines[0], error_lines[0]


def test_status_shows_queues_workers_and_ledger(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    settings = make_settings()
    for _ in range(3):
        enqueue(settings, MSG, priority="low", model="gpt-4o-mini")
    proc = run_cli(settings, "status", "--ping-timeout", "0.3")
    assert proc.returncode == 0, proc.stderr
    assert "Batch     3 queued" in proc.stdout
    assert "gpt-4o-mini" in proc.stdout
    assert "Workers   none answered within 0.3s" in proc.stdout
    assert "Ledger    0 requests" in proc.stdout
    assert ("Flush     every 60s (ROUTER_FLUSH_INTERVAL_S of this process; no beat reported); "
            "last never") in proc.stdout
    assert "Beat      no beat has reported" in proc.stdout

    data = json.loads(run_cli(settings, "status", "--json", "--ping-timeout", "0.3").stdout)
    assert data["queues"]["batch"]["total"] == 3
    assert data["workers"] == []
    assert data["live"]["flush"]["source"] == "setting"  # the live part of GET /v1/stats
    assert data["live"]["stream_workers"] == {"engines": [], "running": 0}


def test_status_with_redis_down_is_one_line(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert_one_clear_line(run_cli(settings, "status"), 1, "cannot read Redis")


def test_submit_usage_errors_exit_2(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert_one_clear_line(run_cli(settings, "submit", "hi", "--priority", "urgent"), 2,
                          "--priority must be one of high, normal, low")


def test_submit_unreachable_api_exits_1(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    proc = run_cli(settings, "submit", "hi", "--url", f"http://127.0.0.1:{free_port()}")
    assert_one_clear_line(proc, 1, "cannot reach the API")


def test_submit_refused_and_waiting_without_workers(
    make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack]
) -> None:
    settings = make_settings(allowed_models=["gpt-4o-mini"])
    url = stack_factory(settings).start_api()
    refused = run_cli(settings, "submit", "hi", "--url", url, "--model", "gpt-5-huge")
    assert_one_clear_line(refused, 2, "the API refused", "field: model", "HTTP 400")
    # No batch worker runs: the spinner gives up at --timeout with a pointer to `tail`.
    waiting = run_cli(settings, "submit", "hi", "--url", url, "--priority", "low",
                      "--timeout", "1.5")
    assert_one_clear_line(waiting, 1, "still queued after 1.5s", "hybrid-router tail")
    assert "accepted " in waiting.stderr and "(route: batch" in waiting.stderr
    unknown = run_cli(settings, "tail", "0" * 32, "--url", url)
    assert_one_clear_line(unknown, 2, "HTTP 404")


@pytest.mark.timeout(180)
def test_submit_and_tail_end_to_end(
    make_settings: Callable[..., Settings], sim_url: str,
    stack_factory: Callable[[Settings], Stack],
) -> None:
    settings = make_settings(upstream_base_url=sim_url, flush_interval_s=1, poll_interval_s=0.5)
    stack = stack_factory(settings)
    url = stack.start_api()
    stack.start_worker("stream", concurrency=4)
    stack.start_worker("batch", concurrency=4)
    stack.start_beat()

    high = run_cli(settings, "submit", "Tell me a joke", "--url", url, "--priority", "high")
    assert high.returncode == 0, (high.stdout, high.stderr, stack.logs())
    assert "(route: stream" in high.stderr and "] done " in high.stderr
    assert len(high.stdout.strip()) > 10  # the streamed tokens
    request_id = high.stderr.split("accepted ", 1)[1].split()[0]

    low = run_cli(settings, "submit", "Summarise", "--url", url, "--priority", "low",
                  "--timeout", "60")
    assert low.returncode == 0, (low.stdout, low.stderr, stack.logs())
    assert "(route: batch" in low.stderr and "completed via batch" in low.stderr
    assert low.stdout.strip()

    tailed = run_cli(settings, "tail", request_id, "--url", url, "--json")
    assert tailed.returncode == 0, tailed.stderr
    kinds = [json.loads(line)["type"] for line in tailed.stdout.splitlines()]
    assert kinds[0] == "accepted" and kinds[-1] == "done" and "token" in kinds

    status = run_cli(settings, "status", "--json", "--ping-timeout", "2")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert sorted(w.split("-")[0] for w in data["workers"]) == ["batch", "stream"]
    assert data["ledger"]["total"]["requests"] == 2
    assert float(data["ledger"]["batch"]["savings_usd"]) > 0
    assert data["queues"]["batch"]["total"] == 0 and data["batches_in_flight"]["total"] == 0
    assert data["last_flush"].get("at")


def test_flower_basic_auth_from_settings_and_kept_off_the_command_line(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(flower_basic_auth="ops:s3cret-pass")
    port = free_port()
    flower = ManagedProcess("flower", cli_argv("flower", "--port", str(port)),
                            child_env(settings), tmp_path / "flower.log").start()
    try:
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not flower.alive():
                raise RuntimeError(flower.output()[-2000:])
            return httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200

        wait_until(up, 60, 0.2, message="flower")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        authed = httpx.get(f"{base}/api/workers", auth=("ops", "s3cret-pass"), timeout=10)
        assert authed.status_code == 200
        assert httpx.get(f"{base}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
        cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes()
        assert b"s3cret-pass" not in cmdline
    finally:
        flower.stop()
