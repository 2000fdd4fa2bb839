"""Shared benchmark plumbing: percentiles, side-by-side tables, JSON output, machine facts.

Every benchmark measures the router and a baseline in the same run (the machine is shared and
noisy, so figures from different runs are not comparable) and writes `bench/out/<name>.json`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

OUT_DIR = Path(__file__).resolve().parent / "out"
T = TypeVar("T")


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean of durations given in seconds, reported in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem"] = fh.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write `bench/out/<name>.json` with the machine description attached."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """Run a load generator on uvloop when it is installed (uvicorn[standard] brings it):
    the client shares the cores with the server under test, so its CPU per request matters."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- CPU accounting ----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None  # exited while we looked


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group (a `ManagedProcess` runs in its own session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def child_pids(marker: str) -> list[int]:
    """This process's children whose command line contains `marker` (e.g. the simulator, which
    `hybrid_router.simulator.testing.running_simulator` starts in our process group)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) and int(fields[1]) == os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if marker.encode() in fh.read().replace(b"\0", b" "):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def pids_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) used so far by these processes."""
    total = 0
    for pid in pids:
        if fields := _stat_fields(pid):
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process of a process group.

    The API runs in its own session (`ManagedProcess`), so its group is the uvicorn supervisor
    and all its workers. CPU per request is the figure that survives a shared, noisy machine:
    throughput and tail latency move with whatever else runs, CPU per request barely does.
    """
    return pids_cpu_s(group_pids(pgid))


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all cores; idle and iowait excluded)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK  # up to steal; minus idle, iowait


class CpuMeter:
    """CPU seconds used between two snapshots: this process (the load generator), the named
    process groups (the router's processes, resolved to pids once, so a snapshot reads only
    their /proc files) or pids, and the whole machine."""

    def __init__(self, groups: Mapping[str, int] | None = None,
                 pids: Mapping[str, Sequence[int]] | None = None) -> None:
        self.pids = {name: group_pids(pgid) for name, pgid in (groups or {}).items()}
        self.pids.update({name: list(p) for name, p in (pids or {}).items()})

    def snapshot(self) -> dict[str, float]:
        snap = {"client": time.process_time(), "machine": machine_busy_s()}
        snap.update({name: pids_cpu_s(pids) for name, pids in self.pids.items()})
        return snap


def cpu_percent(cpu_s: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """CPU seconds over a wall time as percent of one core (the machine's maximum is 100 x cores)."""
    return {name: round(100 * v / wall_s, 1) if wall_s else float("nan")
            for name, v in cpu_s.items()}


# --- closed-loop (sustained) load ----------------------------------------------------------------

LAG_PROBE_S = 0.01


@dataclass
class Timed(Generic[T]):
    """One stream of a closed loop: when it started and ended (perf_counter) and its result."""

    start: float
    end: float
    value: T


@dataclass
class ClosedLoopRun(Generic[T]):
    """What one or more closed-loop runs measured inside their windows (see `closed_loop`)."""

    samples: list[Timed[T]] = field(default_factory=list)
    window_s: float = 0.0
    started: int = 0  # every stream started, ramp-up and tail included
    errors: int = 0  # streams started in the window that raised or timed out
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds used over the windows
    lag_s: list[float] = field(default_factory=list)  # the client's event-loop lag, probed

    def merge(self, other: ClosedLoopRun[T]) -> None:
        self.samples += other.samples
        self.window_s += other.window_s
        self.started += other.started
        self.errors += other.errors
        for name, value in other.cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + value
        self.lag_s += other.lag_s

    @property
    def starts_per_s(self) -> float:
        return (len(self.samples) + self.errors) / self.window_s if self.window_s else 0.0

    def cpu_percent(self) -> dict[str, float]:
        return cpu_percent(self.cpu_s, self.window_s)


async def closed_loop(start_stream: Callable[[], Awaitable[T]], streams: int, *,
                      measure_s: float, ramp_s: float, meter: CpuMeter | None = None,
                      timeout_s: float = 60.0) -> ClosedLoopRun[T]:
    """Keep `streams` streams in flight: `streams` loops, each starting its next stream as soon
    as its previous one ends.

    The loops' first starts are spread evenly over `ramp_s` (about one stream's duration, so
    starts are not synchronized); streams started during that ramp-up are discarded. Samples are
    the streams started in the window [ramp_s, ramp_s + measure_s). After the window the loops
    go on starting (discarded) streams until no sampled stream is in flight, so every sampled
    stream ran its whole life at full load; then they stop and the last streams drain. CPU and
    the client's event-loop lag (a 10 ms sleep's overshoot) are measured over the window.
    """
    run: ClosedLoopRun[T] = ClosedLoopRun()
    meter = meter or CpuMeter()
    t0 = time.perf_counter()
    win_lo = t0 + ramp_s
    win_hi = win_lo + measure_s
    in_flight = 0  # sampled streams not yet ended

    async def loop(index: int) -> None:
        nonlocal in_flight
        await asyncio.sleep(index * ramp_s / streams)
        while True:
            start = time.perf_counter()
            if start >= win_hi and in_flight == 0:
                return
            sampled = win_lo <= start < win_hi
            in_flight += sampled
            run.started += 1
            try:
                value = await asyncio.wait_for(start_stream(), timeout_s)
            except Exception:  # a failed stream is counted; the load goes on
                run.errors += sampled
                await asyncio.sleep(0.05)
                continue
            finally:
                in_flight -= sampled
            if sampled:
                run.samples.append(Timed(start, time.perf_counter(), value))

    async def measure() -> None:
        await asyncio.sleep(max(0.0, win_lo - time.perf_counter()))
        before, wall0 = meter.snapshot(), time.perf_counter()
        while (now := time.perf_counter()) < win_hi:
            await asyncio.sleep(LAG_PROBE_S)
            run.lag_s.append(time.perf_counter() - now - LAG_PROBE_S)
        after, run.window_s = meter.snapshot(), time.perf_counter() - wall0
        run.cpu_s = {name: after[name] - before[name] for name in after}

    await asyncio.gather(measure(), *(loop(i) for i in range(streams)))
    return run


def start_replica(primary_url: str, workdir: Path) -> Any:
    """A redis-server replicating `primary_url` (in sync on return): with it, the intake waits
    for the replica before each 202 (``ROUTER_REDIS_WAIT_REPLICAS``), which is what
    ``--replica`` runs measure. Returns its `tests.support.ManagedProcess`."""
    from urllib.parse import urlsplit

    import redis

    from tests.support import start_redis_server, wait_until

    parts = urlsplit(primary_url)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 6379)
    replica_dir = workdir / "replica"
    replica_dir.mkdir(exist_ok=True)
    proc, url = start_redis_server(replica_dir, extra_args=("--replicaof", host, port))
    client = redis.Redis.from_url(url)
    wait_until(lambda: client.info("replication").get("master_link_status") == "up", 30,
               message="replica in sync")
    client.close()
    return proc
