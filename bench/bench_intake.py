"""Benchmark 3 — intake: low-priority enqueues per second through HTTP, and p99 at half load.

Side by side, same server, same run: the router's ``POST /v1/requests`` (priority low) against
the floor of the same HTTP stack (``GET /healthz`` on the same API process), at saturation and
paced at half the router's saturated rate. Also checks that every 202 left exactly one entry in
the batch queue (nothing lost under load). Each row also gives the API processes' CPU time
per request, the one figure that stays comparable on a shared machine.

    python -m bench.bench_intake            # full run (~1 minute) -> bench/out/intake.json
    python -m bench.bench_intake --quick    # smoke size -> bench/out/intake_quick.json
    python -m bench.bench_intake --workers 2   # two API processes (more throughput, but on a
                                               # 2-core machine they contend with Redis and
                                               # the load generator, and half load's p99 suffers)

The default is one API process, as ``hybrid-router api``, ``hybrid-router up`` and the compose
file run it.

    python -m bench.bench_intake --api-processes 1,2,3 [--quick]   # scale-out
    python -m bench.bench_intake --replica    # with a replica: the cost of waiting for it

Scale-out: saturated ``POST /v1/requests`` (low) through 1, 2, 3 API processes (uvicorn
workers), each count with a fresh API; reported: requests/s, p50/p99, and the CPU the API
processes and Redis used per request (microseconds), which is what sizes a cluster on a machine
whose two cores the load generator, Redis and the API share (docs/OPERATIONS.md, "Sizing").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from bench.common import group_cpu_s, run_fast, start_replica, summary_ms, table, write_result
from bench.httpload import LoadResult, run_load
from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from tests.support import ManagedProcess, child_env, cli_argv, free_port, start_redis_server, wait_until

TARGET_RATE = 3000.0
TARGET_P99_MS = 10.0


def start_api(settings: Settings, workdir: Path, workers: int) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = cli_argv("api", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers))
    env = child_env(settings, {"ROUTER_LOG_LEVEL": "WARNING"})
    proc = ManagedProcess("api", argv, env, workdir / "api.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 30,
               message="API ready")
    return proc, url


def row(name: str, res: LoadResult, cpu_s: float) -> list[object]:
    s = summary_ms(res.latencies_s)
    return [name, round(res.rate), res.ok, res.errors, s["p50_ms"], s["p90_ms"], s["p99_ms"],
            cpu_us_per_request(res, cpu_s)]


def cpu_us_per_request(res: LoadResult, cpu_s: float) -> int:
    return round(cpu_s * 1e6 / res.ok) if res.ok else 0


BODY = orjson.dumps({
    "model": "gpt-4o-mini",
    "priority": "low",
    "messages": [{"role": "user", "content": "Summarise the quarterly report in one line."}],
    "max_tokens": 64,
})
HEADERS = {"Authorization": "Bearer bench-key", "Content-Type": "application/json"}


async def saturate(url: str, api_pgid: int, redis_pgid: int, connections: int,
                   duration: float) -> tuple[LoadResult, float, float]:
    """Saturated low POSTs; the result and the CPU seconds the API and Redis used."""
    await run_load(f"{url}/healthz", method="GET", connections=4, duration_s=0.5)
    api0, redis0 = group_cpu_s(api_pgid), group_cpu_s(redis_pgid)
    result = await run_load(f"{url}/v1/requests", body=BODY, headers=HEADERS,
                            connections=connections, duration_s=duration)
    return result, group_cpu_s(api_pgid) - api0, group_cpu_s(redis_pgid) - redis0


def scale_out(counts: list[int], duration: float, connections: int, quick: bool) -> int:
    """Saturated low intake through 1, 2, 3... API processes; CPU per request of each part."""
    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-intake-scale-"))
    redis_proc, redis_url = start_redis_server(workdir)
    rows: list[dict[str, Any]] = []
    lost = 0
    try:
        for count in counts:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix=f"bench{count}",
                                log_level="WARNING", api_keys={"bench-key": "bench"})
            api_proc, api_url = start_api(settings, workdir, count)
            try:
                result, api_cpu, redis_cpu = run_fast(saturate(
                    api_url, api_proc.pid, redis_proc.pid, connections, duration))
                client = redis.Redis.from_url(settings.redis_url)
                queued = int(client.llen(Keys(settings.key_prefix).pending("gpt-4o-mini")))
                client.close()
                lost += queued != result.ok
            finally:
                api_proc.stop()
            s = summary_ms(result.latencies_s)
            rows.append({"api_processes": count, "rate": round(result.rate), "ok": result.ok,
                         "errors": result.errors, "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
                         "api_cpu_us_per_request": cpu_us_per_request(result, api_cpu),
                         "redis_cpu_us_per_request": cpu_us_per_request(result, redis_cpu),
                         "client_cpu_us_per_request": cpu_us_per_request(result,
                                                                         result.client_cpu_s),
                         "queued_equals_accepted": queued == result.ok})
    finally:
        redis_proc.stop()
    print(f"\nIntake scale-out — saturated POST /v1/requests (low), {connections} connections, "
          f"{duration:g}s per count\n")
    print(table(["API processes", "req/s", "ok", "errors", "p50 ms", "p99 ms", "API CPU us/req",
                 "Redis CPU us/req", "client CPU us/req", "queued == accepted"],
                [[r["api_processes"], r["rate"], r["ok"], r["errors"], r["p50_ms"], r["p99_ms"],
                  r["api_cpu_us_per_request"], r["redis_cpu_us_per_request"],
                  r["client_cpu_us_per_request"], r["queued_equals_accepted"]] for r in rows]))
    path = write_result("intake_scale_quick" if quick else "intake_scale", {
        "quick": quick, "connections": connections, "duration_s": duration, "rows": rows})
    print(f"written: {path}")
    return 0 if lost == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1,
                        help="API worker processes (default 1, as shipped)")
    parser.add_argument("--replica", action="store_true",
                        help="with a replica of the Redis: each 202 waits for it (WAIT)")
    parser.add_argument("--api-processes", default="",
                        help="scale-out over these API process counts (e.g. 1,2,3); runs only "
                        "the saturated POST for each")
    args = parser.parse_args(argv)
    duration = 1.0 if args.quick else args.duration
    connections = 8 if args.quick else args.connections
    if args.api_processes:
        return scale_out([int(x) for x in args.api_processes.split(",")], duration,
                         connections, args.quick)

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-intake-"))
    redis_proc, redis_url = start_redis_server(workdir)
    replica = start_replica(redis_url, workdir) if args.replica else None
    settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench", log_level="WARNING",
                        api_keys={"bench-key": "bench"})
    api_proc, api_url = start_api(settings, workdir, args.workers)
    headers = {"Authorization": "Bearer bench-key", "Content-Type": "application/json"}
    body = orjson.dumps({
        "model": "gpt-4o-mini",
        "priority": "low",
        "messages": [{"role": "user", "content": "Summarise the quarterly report in one line."}],
        "max_tokens": 64,
    })
    try:
        cpu: dict[str, float] = {}

        async def measured(name: str, load: Coroutine[Any, Any, LoadResult]) -> LoadResult:
            before = group_cpu_s(api_proc.pid)
            result = await load
            cpu[name] = group_cpu_s(api_proc.pid) - before
            return result

        async def scenario() -> dict[str, LoadResult]:
            out: dict[str, LoadResult] = {}
            await run_load(f"{api_url}/healthz", method="GET", connections=4, duration_s=0.5)
            out["floor_sat"] = await measured("floor_sat", run_load(
                f"{api_url}/healthz", method="GET", headers=headers, connections=connections,
                duration_s=duration))
            out["router_sat"] = await measured("router_sat", run_load(
                f"{api_url}/v1/requests", body=body, headers=headers, connections=connections,
                duration_s=duration))
            half = max(10.0, out["router_sat"].rate / 2)
            out["router_half"] = await measured("router_half", run_load(
                f"{api_url}/v1/requests", body=body, headers=headers, connections=connections,
                duration_s=duration, rate_per_s=half))
            out["floor_half"] = await measured("floor_half", run_load(
                f"{api_url}/healthz", method="GET", headers=headers, connections=connections,
                duration_s=duration, rate_per_s=half))
            return out

        results = run_fast(scenario())
        client = redis.Redis.from_url(settings.redis_url)
        queued = client.llen(Keys(settings.key_prefix).pending("gpt-4o-mini"))
        accepted = results["router_sat"].ok + results["router_half"].ok
    finally:
        api_proc.stop()
        if replica is not None:
            replica.stop()
        redis_proc.stop()

    headers_row = ["scenario", "req/s", "ok", "errors", "p50 ms", "p90 ms", "p99 ms",
                   "API CPU us/req"]
    rows = [
        row("GET /healthz (HTTP floor), saturated", results["floor_sat"], cpu["floor_sat"]),
        row("POST /v1/requests low, saturated", results["router_sat"], cpu["router_sat"]),
        row("GET /healthz at half load", results["floor_half"], cpu["floor_half"]),
        row("POST /v1/requests low at half load", results["router_half"], cpu["router_half"]),
    ]
    print(f"\nIntake benchmark — {args.workers} API worker(s), {connections} connections, "
          f"{duration:g}s per scenario"
          f"{', with a replica (each 202 waits for it)' if args.replica else ''}\n")
    print(table(headers_row, rows))
    p99_half = summary_ms(results["router_half"].latencies_s)["p99_ms"]
    half = results["router_half"]
    print(f"\nload generator at half load: {cpu_us_per_request(half, half.client_cpu_s)} us CPU per "
          f"request, woke for its slots late by p99 {summary_ms(half.slips_s)['p99_ms']} ms")
    print(f"queued entries {queued} == accepted {accepted}: {queued == accepted}")
    print(f"target: >= {TARGET_RATE:,.0f}/s saturated -> {results['router_sat'].rate:,.0f}/s; "
          f"p99 <= {TARGET_P99_MS} ms at half load -> {p99_half} ms")
    # A quick (smoke) run must not overwrite the figures of the last full run.
    name = ("intake_quick" if args.quick else "intake") + ("_replica" if args.replica else "")
    path = write_result(name, {
        "quick": args.quick,
        "replica": args.replica,
        "api_workers": args.workers,
        "connections": connections,
        "duration_s": duration,
        "scenarios": {k: {"rate": v.rate, "ok": v.ok, "errors": v.errors,
                          "api_cpu_us_per_request": cpu_us_per_request(v, cpu[k]),
                          "client_cpu_us_per_request": cpu_us_per_request(v, v.client_cpu_s),
                          **({"slot_slip_p99_ms": summary_ms(v.slips_s)["p99_ms"]} if v.slips_s
                             else {}),
                          **summary_ms(v.latencies_s)} for k, v in results.items()},
        "queued_equals_accepted": queued == accepted,
        "targets": {"rate_per_s": TARGET_RATE, "p99_ms_half_load": TARGET_P99_MS},
    })
    print(f"written: {path}")
    return 0 if queued == accepted else 1


if __name__ == "__main__":
    sys.exit(main())
