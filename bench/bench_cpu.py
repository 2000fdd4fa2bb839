"""Benchmark 7 — CPU time and Redis commands per stream, per token and per request.

Wall-clock figures (benchmarks 1-3) move with whatever else runs on a shared machine; the work
done per unit does not move as much. Over a FIXED workload this reads the CPU seconds
(user + system, from /proc) of the API, the stream worker and Redis, and Redis's own
``INFO commandstats`` (calls and usec per command), and divides by the units of work:

* idle: 6 s with nothing to do (the per-second housekeeping: heartbeats, sweep, lease renewal);
* events: N high requests, 50 at a time, each followed over SSE (``/events``) to its end;
* drop-in: N/2 streamed ``/v1/chat/completions`` requests, 50 at a time;
* relay: 200 streams of 60 tokens at 30 tokens/s, 100 at a time (per token relayed);
* intake: ``POST /v1/requests`` (low) on 8 keep-alive connections for 4 s (per request).

The stream figures also give "net" values: minus the idle rate times the phase's wall time.
CPU times come in clock ticks (10 ms), so a phase needs a few seconds of work to be readable;
compare two builds by alternating runs (the machine's load still inflates CPU time somewhat).

    python -m bench.bench_cpu              # ~1.5 minutes -> bench/out/cpu.json
    python -m bench.bench_cpu --quick      # smoke size  -> bench/out/cpu_quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.common import group_pids, pids_cpu_s, run_fast, table, write_result
from bench.httpload import run_load
from bench.sseclient import FINAL_TYPES, request_json, router_events, stream_lines
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server

API_KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
Way = Callable[[str, int, float], Awaitable[int]]


def _prompt(tokens: int, tps: float) -> list[dict[str, str]]:
    return [{"role": "user",
             "content": f"[[sim:tokens={tokens}]][[sim:tps={tps:g}]] {uuid.uuid4().hex}"}]


async def events_way(api: str, tokens: int, tps: float) -> int:
    """POST a high request and follow its events to the end; the token events seen."""
    accepted: Any = await request_json(f"{api}/v1/requests", headers=HEADERS, json={
        "model": "gpt-4o-mini", "priority": "high", "messages": _prompt(tokens, tps)})
    seen = 0
    async for event in router_events(f"{api}/v1/requests/{accepted['id']}/events", HEADERS):
        if event["type"] == "token":
            seen += 1
        elif event["type"] in FINAL_TYPES and event["type"] != "done":
            raise RuntimeError(f"stream ended {event}")
    return seen


async def dropin_way(api: str, tokens: int, tps: float) -> int:
    """A streamed drop-in chat completion; the content chunks seen."""
    body = {"model": "gpt-4o-mini", "messages": _prompt(tokens, tps), "stream": True,
            "priority": "high"}
    seen = 0
    async for line in stream_lines(f"{api}/v1/chat/completions", json=body, headers=HEADERS):
        if line.startswith(b"data: {"):
            choices = orjson.loads(line[6:]).get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                seen += 1
    return seen


async def run_many(way: Way, api: str, total: int, at_once: int, tokens: int,
                   tps: float) -> int:
    slots = asyncio.Semaphore(at_once)

    async def one() -> int:
        async with slots:
            return await way(api, tokens, tps)

    return sum(await asyncio.gather(*(one() for _ in range(total))))


class Meter:
    """CPU seconds of named process groups and Redis's command counters, at one instant."""

    def __init__(self, pids: dict[str, list[int]], client: redis.Redis) -> None:
        self.pids = pids
        self.client = client

    def snapshot(self) -> dict[str, Any]:
        stats: Any = self.client.info("commandstats")
        return {"t": time.perf_counter(),
                "cpu": {name: pids_cpu_s(pids) for name, pids in self.pids.items()},
                "commands": {name.removeprefix("cmdstat_"): (v["calls"], v["usec"])
                             for name, v in stats.items()}}


def per_unit(before: dict[str, Any], after: dict[str, Any], units: int, unit: str,
             idle: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU us and Redis calls / usec per unit of work between two snapshots."""
    wall = after["t"] - before["t"]
    out: dict[str, Any] = {unit + "s": units, "wall_s": round(wall, 2)}
    for name, cpu_s in after["cpu"].items():
        used = cpu_s - before["cpu"][name]
        out[f"{name}_cpu_us"] = round(used * 1e6 / units, 1)
        if idle is not None:
            net = used - idle["cpu_per_s"][name] * wall
            out[f"{name}_net_cpu_us"] = round(net * 1e6 / units, 1)
    commands = {}
    for name, (calls, usec) in after["commands"].items():
        calls0, usec0 = before["commands"].get(name, (0, 0))
        if calls > calls0 and name not in ("info", "config|resetstat"):
            commands[name] = (calls - calls0, usec - usec0)
    out["redis_calls"] = round(sum(c for c, _ in commands.values()) / units, 2)
    out["redis_usec"] = round(sum(u for _, u in commands.values()) / units, 1)
    out["by_command"] = {name: {"calls": round(c / units, 3), "usec": round(u / units, 2)}
                         for name, (c, u) in sorted(commands.items(), key=lambda kv: -kv[1][1])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args(argv)
    streams = 20 if args.quick else args.streams
    relay_streams = 10 if args.quick else 200
    idle_s, intake_s = (1.0, 0.5) if args.quick else (6.0, 4.0)
    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-cpu-"))
    redis_proc, redis_url = start_redis_server(workdir)
    results: dict[str, Any] = {}
    try:
        with running_simulator(ttft_s=0.05, tokens_per_s=50, min_tokens=20,
                               max_tokens=20) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING")
            stack = Stack(settings)
            try:
                api = stack.start_api()
                worker = stack.start_worker("stream")
                api_proc = next(p for p in stack.processes if p.name == "api")
                meter = Meter({"api": group_pids(api_proc.pid),
                               "worker": group_pids(worker.pid),
                               "redis": [redis_proc.pid]}, redis.Redis.from_url(settings.redis_url))
                run_fast(_measure(api, meter, streams, relay_streams, idle_s, intake_s, results))
            finally:
                stack.stop()
    finally:
        redis_proc.stop()
    _print(results)
    path = write_result("cpu_quick" if args.quick else "cpu", results)
    print(f"\nwritten: {path}")
    return 0


async def _measure(api: str, meter: Meter, streams: int, relay_streams: int, idle_s: float,
                   intake_s: float, results: dict[str, Any]) -> None:
    await run_many(events_way, api, 20, 10, 20, 50)  # warm-up: scripts loaded, pools filled
    await run_many(dropin_way, api, 10, 10, 20, 50)
    await asyncio.sleep(1.0)
    before = meter.snapshot()
    await asyncio.sleep(idle_s)
    idle = per_unit(before, meter.snapshot(), 1, "second")
    idle["cpu_per_s"] = {name: idle[f"{name}_cpu_us"] / 1e6 / idle["wall_s"]
                         for name in meter.pids}
    idle["redis_calls_per_s"] = round(idle["redis_calls"] / idle["wall_s"], 1)
    results["idle"] = idle
    phases: list[tuple[str, Way, int, int, int, float, str]] = [
        ("events", events_way, streams, 50, 20, 50.0, "stream"),
        ("dropin", dropin_way, streams // 2, 50, 20, 50.0, "stream"),
        ("relay", events_way, relay_streams, 100, 60, 30.0, "token"),
    ]
    for name, way, total, at_once, tokens, tps, unit in phases:
        before = meter.snapshot()
        await run_many(way, api, total, at_once, tokens, tps)
        units = total * tokens if unit == "token" else total
        results[name] = per_unit(before, meter.snapshot(), units, unit, idle)
    body = orjson.dumps({"model": "gpt-4o-mini", "priority": "low", "max_tokens": 64,
                         "messages": [{"role": "user", "content":
                                       "Summarise the quarterly report in one line."}]})
    headers = {**HEADERS, "Content-Type": "application/json"}
    await run_load(f"{api}/v1/requests", body=body, headers=headers, connections=4,
                   duration_s=0.3)
    before = meter.snapshot()
    load = await run_load(f"{api}/v1/requests", body=body, headers=headers, connections=8,
                          duration_s=intake_s)
    results["intake"] = per_unit(before, meter.snapshot(), max(1, load.ok), "request")
    results["intake"]["errors"] = load.errors


def _print(results: dict[str, Any]) -> None:
    print("\nCPU benchmark — CPU us (user + system) and Redis commands per unit of work "
          "(net: minus the idle rate)\n")
    rows = []
    for phase, unit in (("events", "stream"), ("dropin", "stream"), ("relay", "token"),
                        ("intake", "request")):
        r = results[phase]
        rows.append([phase, unit, r[unit + "s"], r["api_cpu_us"], r["worker_cpu_us"],
                     r["redis_cpu_us"], r["redis_calls"], r["redis_usec"]])
    print(table(["phase", "per", "units", "API us", "worker us", "Redis us", "Redis calls",
                 "Redis usec"], rows))
    idle = results["idle"]
    print(f"\nidle: API {idle['api_cpu_us'] / 1e4 / idle['wall_s']:.1f} %, worker "
          f"{idle['worker_cpu_us'] / 1e4 / idle['wall_s']:.1f} %, Redis "
          f"{idle['redis_cpu_us'] / 1e4 / idle['wall_s']:.1f} % of a core; "
          f"{idle['redis_calls_per_s']} Redis calls/s")
    print("\nRedis calls per stream (events), by command:")
    print(table(["command", "calls", "usec"],
                [[name, v["calls"], v["usec"]]
                 for name, v in list(results["events"]["by_command"].items())[:12]]))


if __name__ == "__main__":
    raise SystemExit(main())
