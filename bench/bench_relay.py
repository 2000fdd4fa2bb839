"""Benchmark 2 — token relay: throughput end to end, and streams one worker process sustains.

A. Throughput: K concurrent high requests whose upstream answers as fast as it can; the
   subscriber is one pattern subscription on the request channels (the cheapest way to read
   them). Reported: tokens/s delivered to subscribers, against a direct client reading the same
   number of streams from the simulator in the same run.
B. Capacity: streams at 30 tokens/s each (60 tokens, 2 s) through ONE stream worker process;
   the inter-token gaps are measured at the subscriber (one pattern subscription, as in A); the
   added gap is the router gap p99 minus the direct gap p99 (the same streams read straight
   from the simulator) at the same level. Two load models:
   * sustained (what the target is judged on): N streams kept in flight, a closed loop (a loop
     submits its next stream when the subscriber saw its previous one end; first starts spread
     over one stream, ramp-up streams discarded), direct then router at each level. Capacity is
     the highest level whose added p99 <= 50 ms (with no errors, and the router starting at
     least 90% of the direct starts/s, so that N streams really were streaming) before the
     first level that misses. After two missed levels the rest are skipped (--all-levels);
   * burst: N streams started at the same instant (how fast N simultaneous starts are absorbed).

C. Scale-out (``--stream-workers 1,2,3``, instead of A and B): the same sustained load
   (``--scale-streams`` per worker, 30 tokens/s each) through 1, 2, 3 stream worker processes;
   reported: streams kept, starts/s, events/s, added gap p99, and the CPU the workers, the API
   and Redis used per stream in flight and per 1,000 token events/s. On a 2-core machine the
   CPU is the limit, so the CPU figures (not the stream counts) are what sizes a cluster
   (docs/OPERATIONS.md, "Sizing").

    python -m bench.bench_relay            # full run (2-4 minutes)
    python -m bench.bench_relay --quick    # smoke size
    python -m bench.bench_relay --stream-workers 1,2,3 [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import orjson
import redis.asyncio as aioredis

from bench.common import (
    ClosedLoopRun,
    CpuMeter,
    child_pids,
    closed_loop,
    percentile,
    run_fast,
    table,
    write_result,
)
from bench.sseclient import request_json, stream_lines
from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server

API_KEY = "bench-key"
TARGET_TOKENS_PER_S = 10_000
TARGET_STREAMS = 300
GAP_LIMIT_MS = 50.0
SUSTAINED_SHARE = 0.9  # starts/s over N / stream seconds: N streams really were streaming


class Relayed(NamedTuple):
    """One stream as its reader saw it: token events, gaps between them, first one's time."""

    tokens: int
    gaps: list[float]
    first_at: float


async def _direct_stream(sim_url: str, tokens: int, tps: float) -> Relayed:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user",
                          "content": f"[[sim:tokens={tokens}]][[sim:tps={tps:g}]] {uuid.uuid4().hex}"}]}
    count, gaps, first, last = 0, [], 0.0, 0.0
    async for line in stream_lines(f"{sim_url}/chat/completions", json=body,
                                   headers={"Authorization": "Bearer sk-bench"}):
        if not line.startswith(b"data: {"):
            continue
        choices = orjson.loads(line[6:]).get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.perf_counter()
            if count:
                gaps.append(now - last)
            else:
                first = now
            last = now
            count += 1
    return Relayed(count, gaps, first)


async def direct_run(sim_url: str, streams: int, tokens: int, tps: float
                     ) -> tuple[float, int, list[float]]:
    """The same streams read straight from the simulator (lean client, see bench.sseclient)."""
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_direct_stream(sim_url, tokens, tps) for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    total = sum(r.tokens for r in res)
    return elapsed, total, [g for r in res for g in r.gaps]


async def router_run(api_url: str, settings: Settings, streams: int, tokens: int, tps: float
                     ) -> tuple[float, int, list[float], int]:
    """Submit `streams` high requests and read every channel through one pattern subscription.

    Returns elapsed seconds, completion tokens delivered (from `done` usage), inter-event gaps
    and the number of token events."""
    keys = Keys(settings.key_prefix)
    r = aioredis.Redis.from_url(settings.redis_url)
    pubsub = r.pubsub()
    await pubsub.psubscribe(keys.channel_pattern())
    ids: set[str] = set()
    last_seen: dict[str, float] = {}
    gaps: list[float] = []
    done_tokens = 0
    finished: set[str] = set()
    token_events = 0
    prefix_len = len(keys.channel(""))

    async def reader() -> None:
        nonlocal done_tokens, token_events
        while len(finished) < streams:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            now = time.perf_counter()
            rid = msg["channel"][prefix_len:].decode()
            event = orjson.loads(msg["data"])
            kind = event["type"]
            if kind == "token":
                token_events += 1
                if rid in last_seen:
                    gaps.append(now - last_seen[rid])
                last_seen[rid] = now
            elif kind in ("done", "error", "cancelled"):
                finished.add(rid)
                if kind == "done":
                    done_tokens += int((event.get("usage") or {}).get("completion_tokens") or 0)

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=1.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        task = asyncio.create_task(reader())
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(32)

        async def submit() -> None:
            body = {"model": "gpt-4o-mini", "priority": "high",
                    "messages": [{"role": "user", "content":
                                  f"[[sim:tokens={tokens}]][[sim:tps={tps:g}]] {uuid.uuid4().hex}"}]}
            async with sem:
                resp = await client.post(f"{api_url}/v1/requests", json=body,
                                         headers={"Authorization": f"Bearer {API_KEY}"})
                resp.raise_for_status()
                ids.add(resp.json()["id"])

        await asyncio.gather(*(submit() for _ in range(streams)))
        await asyncio.wait_for(task, timeout=300)
        elapsed = time.perf_counter() - t0
    await pubsub.aclose()
    await r.aclose()
    return elapsed, done_tokens, gaps, token_events


async def direct_sustained(sim_url: str, streams: int, tokens: int, tps: float, measure_s: float,
                           meter: CpuMeter) -> ClosedLoopRun[Relayed]:
    """`streams` streams kept in flight straight from the simulator (closed loop)."""
    return await closed_loop(functools.partial(_direct_stream, sim_url, tokens, tps), streams,
                             measure_s=measure_s, ramp_s=tokens / tps, meter=meter)


async def router_sustained(api_url: str, settings: Settings, streams: int, tokens: int,
                           tps: float, measure_s: float, meter: CpuMeter
                           ) -> ClosedLoopRun[Relayed]:
    """`streams` high requests kept in flight (closed loop: a loop submits its next request as
    soon as the subscriber has seen its previous one end), every channel read through one
    pattern subscription and the gaps measured there exactly as in `router_run`. Requests are
    posted with the lean client (bench.sseclient): httpx's pool, with hundreds of requests
    waiting on it, took most of the client's CPU."""
    keys = Keys(settings.key_prefix)
    r = aioredis.Redis.from_url(settings.redis_url)
    pubsub = r.pubsub()
    await pubsub.psubscribe(keys.channel_pattern())
    prefix_len = len(keys.channel(""))
    loop = asyncio.get_running_loop()
    last_seen: dict[str, float] = {}
    first_seen: dict[str, float] = {}
    gaps: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    ends: dict[str, asyncio.Future[Relayed]] = {}

    async def reader() -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            now = time.perf_counter()
            rid = msg["channel"][prefix_len:].decode()
            kind = orjson.loads(msg["data"])["type"]
            if kind == "token":
                counts[rid] = counts.get(rid, 0) + 1
                if rid in last_seen:
                    gaps.setdefault(rid, []).append(now - last_seen[rid])
                else:
                    first_seen[rid] = now
                last_seen[rid] = now
            elif kind in ("done", "error", "cancelled"):
                end = ends.setdefault(rid, loop.create_future())  # the POST may not be back yet
                last_seen.pop(rid, None)
                result = Relayed(counts.pop(rid, 0), gaps.pop(rid, []), first_seen.pop(rid, 0.0))
                if kind == "done":
                    end.set_result(result)
                else:
                    end.set_exception(RuntimeError(f"stream {rid} ended with {kind}"))

    async def one() -> Relayed:
        body = {"model": "gpt-4o-mini", "priority": "high",
                "messages": [{"role": "user", "content":
                              f"[[sim:tokens={tokens}]][[sim:tps={tps:g}]] {uuid.uuid4().hex}"}]}
        accepted = await request_json(f"{api_url}/v1/requests", json=body,
                                      headers={"Authorization": f"Bearer {API_KEY}"})
        rid = accepted["id"]  # type: ignore[index]
        try:
            return await ends.setdefault(rid, loop.create_future())
        finally:
            ends.pop(rid, None)

    task = asyncio.create_task(reader())
    try:
        return await closed_loop(one, streams, measure_s=measure_s, ramp_s=tokens / tps,
                                 meter=meter)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()
        await r.aclose()


def capacity_of(rows: list[dict[str, Any]]) -> int:
    """The highest level whose added gap p99 is within the limit, before the first that is not."""
    capacity = 0
    for row in rows:
        if not row["ok"]:
            break
        capacity = row["streams"]
    return capacity


def capacity_is_lower_bound(rows: list[dict[str, Any]]) -> bool:
    """No level tried was missed: the worker may sustain more than the highest level tried."""
    return bool(rows) and all(row["ok"] for row in rows)


def capacity_text(rows: list[dict[str, Any]], option: str = "--levels") -> str:
    """`capacity_of` as printed: said to be a lower bound when it is one, so the figure is never
    read as the limit."""
    capacity = capacity_of(rows)
    if capacity_is_lower_bound(rows):
        return f"{capacity} or more (no level tried was missed; {option} tries higher ones)"
    return str(capacity)


def gap_row(level: int, d_gaps: list[float], r_gaps: list[float]) -> dict[str, Any]:
    d99, r99 = percentile(d_gaps, 99) * 1000, percentile(r_gaps, 99) * 1000
    return {"streams": level, "direct_gap_p50_ms": round(percentile(d_gaps, 50) * 1000, 2),
            "direct_gap_p99_ms": round(d99, 2),
            "router_gap_p50_ms": round(percentile(r_gaps, 50) * 1000, 2),
            "router_gap_p99_ms": round(r99, 2), "added_gap_p99_ms": round(r99 - d99, 2),
            "ok": bool(r_gaps) and r99 - d99 <= GAP_LIMIT_MS}


def sustained_row(level: int, stream_s: float, d_run: ClosedLoopRun[Relayed],
                  r_run: ClosedLoopRun[Relayed]) -> dict[str, Any]:
    """Gap figures of one level, and whether `level` streams really were streaming: a closed
    loop slows down to what the system can start, so a router (or, on a saturated machine, a
    baseline) that cannot start N / stream_s streams a second has fewer streams streaming than
    N, and its gaps would be measured at a lower load than the level says. A level counts only
    when both ways started at least SUSTAINED_SHARE of that rate; when the direct baseline did
    not, the machine could not measure the level at all."""
    row = gap_row(level, [g for t in d_run.samples for g in t.value.gaps],
                  [g for t in r_run.samples for g in t.value.gaps])
    nominal = level / stream_s
    row["router_start_share"] = round(r_run.starts_per_s / nominal, 3)
    row["direct_start_share"] = round(d_run.starts_per_s / nominal, 3)
    row["gap_ok"] = row["ok"]
    row["ok"] = (row["ok"] and r_run.errors == 0 and row["router_start_share"] >= SUSTAINED_SHARE
                 and row["direct_start_share"] >= SUSTAINED_SHARE)
    row["verdict"] = ("ok" if row["ok"] else
                      "baseline short" if row["direct_start_share"] < SUSTAINED_SHARE else "missed")
    for way, run in (("direct", d_run), ("router", r_run)):
        ttft = [t.value.first_at - t.start for t in run.samples if t.value.tokens]
        row[way] = {"streams_sampled": len(run.samples), "errors": run.errors,
                    "window_s": round(run.window_s, 2), "starts_per_s": round(run.starts_per_s, 1),
                    "events_per_s": round(run.starts_per_s * statistics.fmean(
                        [t.value.tokens for t in run.samples] or [0])),
                    "ttft_ms": {"p50": round(percentile(ttft, 50) * 1000, 1),
                                "p99": round(percentile(ttft, 99) * 1000, 1)},
                    "cpu_percent_of_one_core": run.cpu_percent(),
                    "client_loop_lag_ms": {
                        "p50": round(percentile(run.lag_s, 50) * 1000, 2),
                        "p99": round(percentile(run.lag_s, 99) * 1000, 2)}}
    return row


def scale_out(worker_counts: list[int], per_worker: int, quick: bool, measure_s: float) -> int:
    """C: the same load per worker through 1, 2, 3... stream worker processes."""
    tokens, tps = (10, 30.0) if quick else (60, 30.0)
    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-relay-scale-"))
    redis_proc, redis_url = start_redis_server(workdir)
    rows: list[dict[str, Any]] = []
    try:
        with running_simulator(ttft_s=0.0, tokens_per_s=0.0) as sim_url:
            for count in worker_counts:
                level = per_worker * count
                settings = Settings(redis_url=f"{redis_url}/0", key_prefix=f"bench{count}",
                                    upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                    api_keys={API_KEY: "bench"}, log_level="WARNING",
                                    stream_worker_concurrency=per_worker * 2 + 50)
                stack = Stack(settings)
                try:
                    api_url = stack.start_api()
                    workers = [stack.start_worker("stream") for _ in range(count)]
                    api_proc = next(p for p in stack.processes if p.name == "api")
                    groups = {"api": api_proc.pid, "redis": redis_proc.pid}
                    groups.update({f"worker{i}": w.pid for i, w in enumerate(workers)})
                    meter = CpuMeter(groups, {"simulator": child_pids("-m hybrid_router.simulator")})
                    run_fast(router_run(api_url, settings, 2, 10, 0))  # warm-up
                    run = run_fast(router_sustained(api_url, settings, level, tokens, tps,
                                                    measure_s, meter))
                finally:
                    stack.stop()
                cpu = run.cpu_percent()
                worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
                gaps = [g for t in run.samples for g in t.value.gaps]
                events_per_s = run.starts_per_s * statistics.fmean(
                    [t.value.tokens for t in run.samples] or [0])
                streaming = run.starts_per_s * (tokens - 1) / tps  # streams really in flight
                per_stream = streaming or 1.0
                per_kev = (events_per_s / 1000) or 1.0
                rows.append({
                    "stream_workers": count, "streams": level,
                    "streams_in_flight": round(streaming, 1),
                    "starts_per_s": round(run.starts_per_s, 1),
                    "events_per_s": round(events_per_s), "errors": run.errors,
                    "gap_p99_ms": round(percentile(gaps, 99) * 1000, 1),
                    "cpu_percent_of_one_core": {"workers": round(worker_cpu, 1),
                                                "api": cpu["api"], "redis": cpu["redis"],
                                                "machine": cpu["machine"]},
                    "cpu_ms_per_s_per_stream": {
                        "workers": round(10 * worker_cpu / per_stream, 2),
                        "api": round(10 * cpu["api"] / per_stream, 2),
                        "redis": round(10 * cpu["redis"] / per_stream, 2)},
                    "cpu_percent_per_1000_events_per_s": {
                        "workers": round(worker_cpu / per_kev, 1),
                        "api": round(cpu["api"] / per_kev, 1),
                        "redis": round(cpu["redis"] / per_kev, 1)},
                })
    finally:
        redis_proc.stop()
    print(f"\nC. Scale-out: {per_worker} streams per stream worker kept in flight, {tokens} "
          f"tokens at {tps:g} tokens/s each, {measure_s:g} s measured; cpu in % of one core "
          f"(machine max {100 * (os.cpu_count() or 1)}%); per stream = CPU ms per second per "
          f"stream in flight\n")
    print(table(["workers", "streams", "in flight", "starts/s", "events/s", "gap p99 ms",
                 "errors", "workers cpu", "api cpu", "redis cpu", "machine cpu",
                 "workers ms/s/stream", "api ms/s/stream", "redis ms/s/stream"],
                [[r["stream_workers"], r["streams"], r["streams_in_flight"], r["starts_per_s"],
                  r["events_per_s"], r["gap_p99_ms"], r["errors"],
                  r["cpu_percent_of_one_core"]["workers"], r["cpu_percent_of_one_core"]["api"],
                  r["cpu_percent_of_one_core"]["redis"], r["cpu_percent_of_one_core"]["machine"],
                  r["cpu_ms_per_s_per_stream"]["workers"], r["cpu_ms_per_s_per_stream"]["api"],
                  r["cpu_ms_per_s_per_stream"]["redis"]] for r in rows]))
    path = write_result("relay_scale_quick" if quick else "relay_scale", {
        "quick": quick, "per_worker": per_worker, "tokens": tokens, "tps": tps,
        "measure_s": measure_s, "rows": rows})
    print(f"written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Token relay throughput and capacity")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=100, help="A: concurrent streams")
    parser.add_argument("--tokens", type=int, default=400, help="A: tokens per stream")
    parser.add_argument("--levels", default="100,200,300,400,500,600",
                        help="B sustained: streams kept in flight")
    parser.add_argument("--measure-s", type=float, default=8.0,
                        help="B sustained: measured seconds per level and way")
    parser.add_argument("--all-levels", action="store_true",
                        help="B sustained: go on after two missed levels")
    parser.add_argument("--burst-levels", default="50,100,200,300,400",
                        help="B burst: streams started at the same instant")
    parser.add_argument("--stream-workers", default="",
                        help="C: scale-out over these stream worker counts (e.g. 1,2,3); "
                        "runs C only")
    parser.add_argument("--scale-streams", type=int, default=100,
                        help="C: streams kept in flight per stream worker")
    args = parser.parse_args(argv)
    if args.stream_workers:
        return scale_out([int(x) for x in args.stream_workers.split(",")],
                         5 if args.quick else args.scale_streams, args.quick,
                         0.7 if args.quick else args.measure_s)
    streams_a, tokens_a = (10, 50) if args.quick else (args.streams, args.tokens)
    if args.quick:
        levels, burst_levels, measure_s = [5, 10], [5, 10], 0.7
    else:
        levels = [int(x) for x in args.levels.split(",")]
        burst_levels = [int(x) for x in args.burst_levels.split(",") if x]
        measure_s = args.measure_s
    tokens_b, tps_b = (10, 30.0) if args.quick else (60, 30.0)

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-relay-"))
    redis_proc, redis_url = start_redis_server(workdir)
    data: dict[str, Any] = {}
    rows_a: list[list[object]] = []
    sustained: list[dict[str, Any]] = []
    burst: list[dict[str, Any]] = []
    skipped: list[int] = []
    timings: dict[str, float] = {}
    try:
        with running_simulator(ttft_s=0.0, tokens_per_s=0.0) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING",
                                stream_worker_concurrency=max(512, *levels, *burst_levels) + 50)
            stack = Stack(settings)
            try:
                api_url = stack.start_api()
                worker = stack.start_worker("stream")
                api_proc = next(p for p in stack.processes if p.name == "api")
                meter = CpuMeter({"api": api_proc.pid, "worker": worker.pid,
                                  "redis": redis_proc.pid},
                                 {"simulator": child_pids("-m hybrid_router.simulator")})
                run_fast(router_run(api_url, settings, 2, 10, 0))  # warm-up
                d_el, d_tok, _ = run_fast(direct_run(sim_url, streams_a, tokens_a, 0))
                r_el, r_tok, _, r_events = run_fast(
                    router_run(api_url, settings, streams_a, tokens_a, 0))
                rows_a = [["direct from simulator", streams_a, d_tok, round(d_el, 2),
                           round(d_tok / d_el)],
                          ["router, pattern subscriber", streams_a, r_tok, round(r_el, 2),
                           round(r_tok / r_el)]]
                data["throughput"] = {"streams": streams_a, "tokens_per_stream": tokens_a,
                                      "direct_tokens_per_s": d_tok / d_el,
                                      "router_tokens_per_s": r_tok / r_el,
                                      "router_token_events": r_events}
                t0 = time.perf_counter()
                for level in levels:
                    if not args.all_levels and [r["ok"] for r in sustained[-2:]] == [False] * 2:
                        skipped.append(level)  # two levels missed already: capacity is known
                        continue
                    d_run = run_fast(direct_sustained(sim_url, level, tokens_b, tps_b, measure_s,
                                                      meter))
                    r_run = run_fast(router_sustained(api_url, settings, level, tokens_b, tps_b,
                                                      measure_s, meter))
                    sustained.append(sustained_row(level, (tokens_b - 1) / tps_b, d_run, r_run))
                t1 = time.perf_counter()
                for level in burst_levels:
                    _, _, d_gaps = run_fast(direct_run(sim_url, level, tokens_b, tps_b))
                    _, _, r_gaps, _ = run_fast(
                        router_run(api_url, settings, level, tokens_b, tps_b))
                    burst.append(gap_row(level, d_gaps, r_gaps))
                timings.update(sustained_s=round(t1 - t0, 1),
                               burst_s=round(time.perf_counter() - t1, 1))
            finally:
                stack.stop()
    finally:
        redis_proc.stop()

    def gap_cells(row: dict[str, Any]) -> list[object]:
        return [row["streams"], row["direct_gap_p50_ms"], row["direct_gap_p99_ms"],
                row["router_gap_p50_ms"], row["router_gap_p99_ms"], row["added_gap_p99_ms"],
                "ok" if row["ok"] else "over"]

    gap_headers = ["streams", "direct gap p50", "direct p99", "router gap p50", "router p99",
                   "added p99", f"<= {GAP_LIMIT_MS:g} ms"]
    capacity, burst_capacity = capacity_of(sustained), capacity_of(burst)
    print("\nA. Relay throughput (upstream as fast as it can)\n")
    print(table(["way", "streams", "tokens", "seconds", "tokens/s"], rows_a))
    print(f"\nB. One stream worker, streams of {tokens_b} tokens at {tps_b:g} tokens/s; "
          f"gaps in ms, added = router p99 - direct p99")
    print(f"\nB sustained: N streams kept in flight (closed loop, starts spread over one stream, "
          f"ramp-up discarded), {measure_s:g} s measured per level and way "
          f"[{timings.get('sustained_s')} s]. starts = starts/s over N / "
          f"{(tokens_b - 1) / tps_b:.3g} s "
          f"(1 = N streams streaming); a level is ok when the added p99 is within the limit, "
          f"without errors, and both ways' starts >= {SUSTAINED_SHARE:g}\n")
    print(table([*gap_headers, "router starts", "direct starts", "router err", "direct n",
                 "router n", "level"],
                [[*gap_cells(r)[:-1], "ok" if r["gap_ok"] else "over", r["router_start_share"],
                  r["direct_start_share"], r["router"]["errors"], r["direct"]["streams_sampled"],
                  r["router"]["streams_sampled"], r["verdict"]] for r in sustained]))
    if skipped:
        print(f"not run: {', '.join(map(str, skipped))} (two levels missed already; "
              f"--all-levels runs them)")
    print("\nB sustained, load over the measured windows (ttft = submit to first token at the "
          "reader; cpu in % of one core, machine max "
          f"{100 * (os.cpu_count() or 1)}%; events/s = what the client read)\n")
    load_rows = []
    for r in sustained:
        for way in ("direct", "router"):
            w = r[way]
            cpu = w["cpu_percent_of_one_core"]
            load_rows.append([r["streams"], way, w["starts_per_s"], w["events_per_s"],
                              w["ttft_ms"]["p50"], w["ttft_ms"]["p99"], cpu["client"],
                              w["client_loop_lag_ms"]["p99"], cpu["api"], cpu["worker"],
                              cpu["redis"], cpu["simulator"], cpu["machine"]])
    print(table(["streams", "way", "starts/s", "events/s", "ttft p50", "ttft p99", "client cpu",
                 "client lag p99", "api cpu", "worker cpu", "redis cpu", "sim cpu",
                 "machine cpu"], load_rows))
    print(f"\nB burst: N started at the same instant [{timings.get('burst_s')} s]\n")
    print(table(gap_headers, [gap_cells(r) for r in burst]))
    print(f"\ncapacity (sustained): {capacity_text(sustained)} concurrent streams (target >= "
          f"{TARGET_STREAMS}); burst: {capacity_text(burst, '--burst-levels')}; "
          f"throughput target >= {TARGET_TOKENS_PER_S:,} tokens/s")
    data.update(capacity_streams=capacity, capacity_mode="sustained",
                capacity_is_lower_bound=capacity_is_lower_bound(sustained),
                burst_capacity_streams=burst_capacity,
                burst_capacity_is_lower_bound=capacity_is_lower_bound(burst), sustained=sustained,
                sustained_not_run=skipped, burst=burst)
    path = write_result("relay_quick" if args.quick else "relay", {
        "quick": args.quick, "timings_s": timings, **data,
        "targets": {"tokens_per_s": TARGET_TOKENS_PER_S, "streams": TARGET_STREAMS,
                    "added_gap_p99_ms": GAP_LIMIT_MS}})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
