"""`hybrid-router up` as a user runs it: one subprocess that brings up everything, serves a
stream and a batch request end to end, shows them in /metrics and Flower, and leaves no
process behind when stopped (SIGINT / SIGTERM) or when one of its children dies."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from hybrid_router.router.client import RouterClient
from hybrid_router.router.core.runtime_config import set_flush_interval
from hybrid_router.settings import Settings
from tests.support import REPO_ROOT, delete_prefix, free_port, wait_until

BANNER_READY = "hybrid-router is up."


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, session) of a live process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> set[int]:
    """Every process below `root`, plus every member of the sessions its children lead."""
    stats = {pid: s for pid in _all_pids() if (s := _proc_stat(pid)) is not None}
    found: set[int] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, s in stats.items() if s[1] in frontier and pid not in found}
        found |= children
        frontier = children
    sessions = {pid for pid in found if stats[pid][3] == pid}
    found |= {pid for pid, s in stats.items() if s[3] in sessions}
    return found


@dataclass
class UpRun:
    """One `hybrid-router up` subprocess with its output in a file."""

    env: dict[str, str]
    args: list[str]
    out_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: dict[str, int] = field(default_factory=dict)

    def start(self) -> UpRun:
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hybrid_router.router.cli.main", "up", *self.args], env=self.env,
                cwd=str(REPO_ROOT), stdout=out, stderr=subprocess.STDOUT,
            )
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 150) -> str:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            return BANNER_READY in self.output()

        wait_until(ready, timeout, 0.2, message="hybrid-router up banner")
        # The banner is written in one go after the ready line; wait for its last section.
        wait_until(lambda: "hybrid-router status" in self.output(), 10, 0.05, message="banner end")
        text = self.output()
        self.pids = {name: int(pid) for pid, name in
                     re.findall(r"^\s+pid (\d+)\s+(\S+)\s*$", text, flags=re.MULTILINE)}
        return text

    def url_of(self, label: str) -> str:
        match = re.search(rf"^  {label}\s+(http://\S+)", self.output(), flags=re.MULTILINE)
        assert match, f"no {label} URL in banner:\n{self.output()}"
        return match.group(1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Last resort in a failing test: kill `up` and every process it started."""
        if self.proc is None:
            return
        leftovers = _descendants(self.proc.pid) | set(self.pids.values())
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _up_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "OPENAI_", "SIM_"))}
    env.update({
        "ROUTER_REDIS_URL": redis_url,
        "ROUTER_KEY_PREFIX": prefix,
        "ROUTER_FLUSH_INTERVAL_S": "1",
        "ROUTER_POLL_INTERVAL_S": "0.5",
        "ROUTER_LOG_FORMAT": "json",
        "SIM_TTFT_S": "0",
        "SIM_TOKENS_PER_S": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@pytest.fixture
def up_runs(tmp_path: Path, redis_base_url: str) -> Iterator[list[UpRun]]:
    runs: list[UpRun] = []
    yield runs
    for run in runs:
        run.kill()
        delete_prefix(f"{redis_base_url}/0", run.env["ROUTER_KEY_PREFIX"])
        kept = re.search(r"logs kept in (\S+)", run.output())
        if kept and Path(kept.group(1)).name.startswith("hybrid-router-up-"):
            shutil.rmtree(kept.group(1), ignore_errors=True)


def _assert_nothing_left(run: UpRun, tracked: set[int]) -> None:
    left = sorted(pid for pid in tracked if _alive(pid))
    assert not left, f"processes left behind: {left}\n{run.output()[-3000:]}"


@pytest.mark.timeout(300)
def test_up_runs_both_lanes_metrics_and_flower_then_stops_clean(
    tmp_path: Path, redis_base_url: str, up_runs: list[UpRun]
) -> None:
    port, sim_port, flower_port = free_port(), free_port(), free_port()
    log_dir = tmp_path / "up-logs"
    run = UpRun(_up_env(f"{redis_base_url}/0", f"up{uuid.uuid4().hex[:8]}"),
                ["--port", str(port), "--sim-port", str(sim_port), "--flower-port",
                 str(flower_port), "--log-dir", str(log_dir), "--sim-batch-turnaround", "0.3",
                 "--no-logs"],
                tmp_path / "up.out").start()
    up_runs.append(run)
    assert run.proc is not None
    banner = run.wait_ready()
    assert f"SIMULATOR at http://127.0.0.1:{sim_port}/v1" in banner  # every port is settable
    assert "no upstream key is configured" in banner
    assert run.url_of("Flower") == f"http://127.0.0.1:{flower_port}"
    assert re.search(r"^  flush\s+every 1s \(ROUTER_FLUSH_INTERVAL_S of beat\)$", banner,
                     flags=re.MULTILINE), banner
    assert re.search(rf"^  logs\s+{re.escape(str(log_dir))}$", banner, flags=re.MULTILINE)
    assert "(ROUTER_REDIS_URL)" in banner
    assert set(run.pids) == {"simulator", "api", "stream-worker", "batch-worker", "beat", "flower"}
    tracked = _descendants(run.proc.pid) | set(run.pids.values())
    api = run.url_of("API")
    assert api == f"http://127.0.0.1:{port}"

    with RouterClient(api) as client:
        high = client.submit([{"role": "user", "content": "Tell me a joke"}], priority="high")
        low = client.submit([{"role": "user", "content": "Summarise the news"}], priority="low")
        assert (high.route, low.route) == ("stream", "batch")
        streamed = "".join(high.tokens())
        assert len(streamed) > 20, streamed
        assert high.result(timeout=30)["status"] == "completed"
        low_record = low.result(timeout=90)
        assert low_record["status"] == "completed", low_record
        assert low_record["result"]["content"]

    metrics = httpx.get(f"{api}/metrics", timeout=10).text
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if "route" in sample.labels:
                key = (sample.name, sample.labels["route"])
                totals[key] = totals.get(key, 0.0) + sample.value
    assert totals[("hybrid_router_finished_requests_total", "stream")] == 1, metrics
    assert totals[("hybrid_router_finished_requests_total", "batch")] == 1, metrics
    assert totals[("hybrid_router_tokens_total", "stream")] > 0, metrics
    assert totals[("hybrid_router_savings_usd_total", "batch")] > 0, metrics
    assert totals[("hybrid_router_savings_usd_total", "stream")] == 0, metrics

    flower = run.url_of("Flower")
    workers = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, timeout=20).json()
    assert sorted(name.split("-")[0] for name in workers) == ["batch", "stream"], workers

    def tasks_seen() -> dict[str, dict[str, object]] | None:
        tasks: dict[str, dict[str, object]] = httpx.get(f"{flower}/api/tasks", timeout=5).json()
        names = {t.get("name") for t in tasks.values()}
        return tasks if {"hr.stream.run", "hr.batch.flush", "hr.batch.poll"} <= names else None

    tasks = wait_until(tasks_seen, 30, 0.5, message="Flower sees tasks of both lanes and beat")
    stream_tasks = [t for t in tasks.values() if t.get("name") == "hr.stream.run"]
    assert any(high.id in str(t.get("args")) for t in stream_tasks), stream_tasks
    assert "Tell me a joke" not in str(tasks) and "Summarise" not in str(tasks)

    assert run.stop(signal.SIGINT) == 0, run.output()[-3000:]
    assert f"stopped, no process left behind; logs kept in {log_dir}" in run.output()
    _assert_nothing_left(run, tracked)
    # A clean stop keeps every process's log (and removes what is not a log).
    assert {p.name for p in log_dir.iterdir()} == {f"{name}.log" for name in run.pids}
    assert (log_dir / "beat.log").stat().st_size > 0


@pytest.mark.timeout(200)
def test_up_starts_a_private_redis_when_the_configured_one_is_down(
    tmp_path: Path, redis_base_url: str, sim_url: str, up_runs: list[UpRun]
) -> None:
    """Also: a simulator the user runs separately (ROUTER_UPSTREAM_BASE_URL, no key) is
    recognised, so `up`'s development defaults apply as when `up` starts the simulator."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    redis_port = free_port()
    env = _up_env(down, f"up{uuid.uuid4().hex[:8]}", ROUTER_UPSTREAM_BASE_URL=sim_url)
    del env["ROUTER_FLUSH_INTERVAL_S"], env["ROUTER_POLL_INTERVAL_S"]
    run = UpRun(env, ["--port", str(free_port()), "--redis-port", str(redis_port), "--no-logs"],
                tmp_path / "up.out").start()
    up_runs.append(run)
    assert run.proc is not None
    banner = run.wait_ready()
    assert "private redis-server" in banner and f"{down} did not answer" in banner
    private = re.search(r"^  Redis\s+(redis://\S+)", banner, flags=re.MULTILINE)
    assert private and private.group(1) == f"redis://127.0.0.1:{redis_port}/0"
    assert f"SIMULATOR at {sim_url} (ROUTER_UPSTREAM_BASE_URL; started separately" in banner
    assert "simulator" not in run.pids  # not started by up
    assert "flush_interval_s=10, poll_interval_s=2" in banner, banner
    assert re.search(r"^  flush\s+every 10s ", banner, flags=re.MULTILINE), banner
    assert re.search(r"^  poll\s+every 2s ", banner, flags=re.MULTILINE), banner
    assert redis.Redis.from_url(private.group(1)).ping()
    assert "redis" in run.pids
    tracked = _descendants(run.proc.pid) | set(run.pids.values())
    api = run.url_of("API")
    assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200
    assert run.stop(signal.SIGTERM) == 0, run.output()[-3000:]
    _assert_nothing_left(run, tracked)


def test_up_without_redis_anywhere_exits_2_with_both_ways_out(
    tmp_path: Path, redis_base_url: str, up_runs: list[UpRun]
) -> None:
    env = _up_env(f"redis://127.0.0.1:{free_port()}/0", "upnoredis", PATH=str(tmp_path))
    run = UpRun(env, ["--port", str(free_port())], tmp_path / "up.out").start()
    up_runs.append(run)
    assert run.proc is not None
    assert run.proc.wait(60) == 2
    text = run.output()
    assert "no redis-server is on PATH" in text
    assert "apt-get install redis-server" in text and "docker run" in text
    assert "ROUTER_REDIS_URL" in text and "Traceback" not in text


def test_up_refuses_a_taken_port_before_starting_anything(
    tmp_path: Path, redis_base_url: str, up_runs: list[UpRun]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = UpRun(_up_env(f"{redis_base_url}/0", "uptaken"), ["--port", str(port)],
                    tmp_path / "up.out").start()
        up_runs.append(run)
        assert run.proc is not None
        assert run.proc.wait(60) == 2
    text = run.output()
    assert f"cannot listen on 127.0.0.1:{port}" in text and "--port" in text
    assert "Traceback" not in text and "pid " not in text


@pytest.mark.timeout(200)
def test_up_exits_1_naming_the_child_that_died(
    tmp_path: Path, redis_base_url: str, up_runs: list[UpRun]
) -> None:
    """Also: a run-time flush interval left in Redis by an earlier run is in force, so the
    banner shows it and where it comes from, not the environment's value."""
    prefix = f"up{uuid.uuid4().hex[:8]}"
    left_over = Settings(redis_url=f"{redis_base_url}/0", key_prefix=prefix)
    with redis.Redis.from_url(f"{redis_base_url}/0") as client:
        set_flush_interval(client, left_over, 5, by="an earlier session")
    run = UpRun(_up_env(f"{redis_base_url}/0", prefix),
                ["--port", str(free_port()), "--no-logs"], tmp_path / "up.out").start()
    up_runs.append(run)
    assert run.proc is not None
    banner = run.wait_ready()
    assert re.search(r"^  flush\s+every 5s \(run-time override set \S+ by an earlier session; "
                     r"ROUTER_FLUSH_INTERVAL_S is 1s; `hybrid-router config reset flush-interval` "
                     r"removes it\)$", banner, flags=re.MULTILINE), banner
    tracked = _descendants(run.proc.pid) | set(run.pids.values())
    victim = run.pids["batch-worker"]
    os.kill(victim, signal.SIGKILL)
    assert run.proc.wait(60) == 1, run.output()[-3000:]
    text = run.output()
    assert f"hybrid-router up: batch-worker (pid {victim}) was killed by SIGKILL" in text, text
    assert "logs kept in" in text
    _assert_nothing_left(run, tracked)


@pytest.mark.timeout(200)
def test_up_killed_hard_takes_its_children_along(
    tmp_path: Path, redis_base_url: str, up_runs: list[UpRun]
) -> None:
    """Even `kill -9` of `up` orphans nothing: each child gets SIGTERM when its parent dies."""
    run = UpRun(_up_env(f"{redis_base_url}/0", f"up{uuid.uuid4().hex[:8]}"),
                ["--port", str(free_port()), "--no-logs"], tmp_path / "up.out").start()
    up_runs.append(run)
    assert run.proc is not None
    run.wait_ready()
    tracked = _descendants(run.proc.pid) | set(run.pids.values())
    assert len(tracked) >= 6
    run.proc.kill()
    run.proc.wait(10)
    wait_until(lambda: not any(_alive(pid) for pid in tracked), 30, 0.2,
               message="children to follow their parent")
    logs = re.search(r"^  logs\s+(\S+)", run.output(), flags=re.MULTILINE)
    if logs:
        shutil.rmtree(logs.group(1), ignore_errors=True)
