"""Benchmark 1 — added time to first token and added gap between tokens.

Same client (bench.sseclient, a lean socket-level client, so the client's own CPU does not
dominate at 200 streams), same simulator (fixed timing), same run, at 1/10/50/200 streams:
  * direct:  the client streams ``/v1/chat/completions`` from the simulator itself;
  * events:  ``POST /v1/requests`` (high) to the router, then its SSE ``/events``;
  * drop-in: ``POST /v1/chat/completions`` (stream) to the router.
Reported: p50/p90/p99 of TTFT per way, the router's added TTFT (router percentile minus direct
percentile at the same level), and the inter-token gap percentiles, in two load models:
  * sustained (what the target is judged on): N streams kept in flight per way, a closed loop
    (each of N loops starts its next stream when its previous one ends; first starts spread over
    one stream's duration, ramp-up streams discarded), the ways alternating in short slices so
    the machine's noise falls on all of them alike (`bench.common.closed_loop`);
  * burst: N streams started at the same instant, per way, a few rounds. This measures how fast
    N simultaneous starts are absorbed, not the overhead with N streams in flight.
Also per level and way: the CPU of the client, API, worker, Redis and the whole machine over the
measured windows, and the client's event-loop lag (if it grows, the client is not keeping up).

    python -m bench.bench_ttft            # full run (about 3 minutes)
    python -m bench.bench_ttft --quick    # smoke size
    python -m bench.bench_ttft --redis tls   # the router on TLS Redis (rediss://, self-signed)
    python -m bench.bench_ttft --redis unix  # the router on Redis over a unix socket
    python -m bench.bench_ttft --replica  # with a replica: the cost of waiting for it (WAIT)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.common import (
    ClosedLoopRun,
    CpuMeter,
    closed_loop,
    percentile,
    run_fast,
    start_replica,
    table,
    write_result,
)
from bench.sseclient import request_json, router_events, stream_lines
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server, start_tls_redis_server

TARGET_LEVEL = 50
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
API_KEY = "bench-key"


@dataclass
class StreamSample:
    """One stream as the client saw it, timed from `t0` (just before its first request)."""

    t0: float
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    _last: float = 0.0

    def token(self) -> None:
        """Record a token arriving now: the first sets the TTFT, the rest the gaps."""
        now = time.perf_counter()
        if self.tokens == 0:
            self.ttft_s = now - self.t0
        else:
            self.gaps_s.append(now - self._last)
        self._last = now
        self.tokens += 1


def _prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Benchmark prompt {uuid.uuid4().hex}"}]


async def direct(sim_url: str, model: str) -> StreamSample:
    body = {"model": model, "messages": _prompt(), "stream": True}
    return await _read_chat_sse(f"{sim_url}/chat/completions", body,
                                {"Authorization": "Bearer sk-bench"})


async def dropin(api_url: str, model: str) -> StreamSample:
    body = {"model": model, "messages": _prompt(), "stream": True, "priority": "high"}
    return await _read_chat_sse(f"{api_url}/v1/chat/completions", body,
                                {"Authorization": f"Bearer {API_KEY}"})


async def _read_chat_sse(url: str, body: dict[str, object], headers: dict[str, str]
                         ) -> StreamSample:
    sample = StreamSample(time.perf_counter())
    async for line in stream_lines(url, json=body, headers=headers):
        if not line.startswith(b"data: {"):
            continue
        chunk = orjson.loads(line[6:])
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            sample.token()
    return sample


async def events(api_url: str, model: str) -> StreamSample:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    sample = StreamSample(time.perf_counter())
    accepted = await request_json(f"{api_url}/v1/requests", headers=headers,
                                  json={"model": model, "messages": _prompt(), "priority": "high"})
    request_id = accepted["id"]  # type: ignore[index]
    async for event in router_events(f"{api_url}/v1/requests/{request_id}/events", headers):
        if event["type"] == "token":
            sample.token()
    return sample


Way = Callable[[str, str], Awaitable[StreamSample]]
WAYS = ("direct", "events", "drop-in")


async def run_burst(ways: dict[str, tuple[Way, str]], concurrency: int, rounds: int,
                    model: str) -> dict[str, list[StreamSample]]:
    """`rounds` rounds; in each, every way starts `concurrency` streams at the same instant."""
    out: dict[str, list[StreamSample]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, (fn, base) in ways.items():
            samples = await asyncio.gather(*(fn(base, model) for _ in range(concurrency)))
            out[name].extend(samples)
    return out


async def run_sustained(ways: dict[str, tuple[Way, str]], level: int, model: str, *,
                        slices: int, slice_s: float, duration_s: dict[str, float],
                        meter: CpuMeter) -> dict[str, ClosedLoopRun[StreamSample]]:
    """`level` streams kept in flight per way (closed loop, see `bench.common.closed_loop`),
    the ways alternating in `slices` slices of `slice_s` measured seconds each, so noise from
    the rest of the machine falls on all of them alike. A slice's ramp-up is one stream's
    duration: the way's last median in `duration_s` (updated here); level 1 has none."""
    out: dict[str, ClosedLoopRun[StreamSample]] = {name: ClosedLoopRun() for name in ways}
    for _ in range(slices):
        for name, (fn, base) in ways.items():
            ramp_s = 0.0 if level == 1 else duration_s[name]
            run = await closed_loop(functools.partial(fn, base, model), level,
                                    measure_s=slice_s, ramp_s=ramp_s, meter=meter)
            out[name].merge(run)
            if run.samples:
                duration_s[name] = percentile([s.end - s.start for s in run.samples], 50)
    return out


def pct_ms(values: list[float], p: float) -> float:
    return round(percentile(values, p) * 1000, 3)


def figures(by_way: dict[str, list[StreamSample]]) -> dict[str, dict[str, Any]]:
    """Per way: TTFT and gap percentiles, and the router ways' added figures (router
    percentile minus direct percentile). Streams that delivered no token are errors."""
    ok = {way: [s for s in samples if s.tokens] for way, samples in by_way.items()}
    direct_ttft = [s.ttft_s for s in ok["direct"]]
    direct_gaps = [g for s in ok["direct"] for g in s.gaps_s]
    out: dict[str, dict[str, Any]] = {}
    for way, samples in ok.items():
        ttft = [s.ttft_s for s in samples]
        gaps = [g for s in samples for g in s.gaps_s]
        router = way != "direct"
        out[way] = {
            "samples": len(ttft),
            "errors": len(by_way[way]) - len(samples),
            "ttft_ms": {f"p{p}": pct_ms(ttft, p) for p in (50, 90, 99)},
            "added_ttft_ms": {f"p{p}": round(pct_ms(ttft, p) - pct_ms(direct_ttft, p), 3)
                              for p in (50, 90, 99)} if router else None,
            "gap_ms": {f"p{p}": pct_ms(gaps, p) for p in (50, 90, 99)},
            "added_gap_ms": {f"p{p}": round(pct_ms(gaps, p) - pct_ms(direct_gaps, p), 3)
                             for p in (50, 99)} if router else None,
            "tokens_per_stream": round(sum(s.tokens for s in samples) / max(1, len(samples)), 1),
        }
    return out


def sustained_figures(runs: dict[str, ClosedLoopRun[StreamSample]]) -> dict[str, dict[str, Any]]:
    out = figures({way: [t.value for t in run.samples] for way, run in runs.items()})
    for way, run in runs.items():
        out[way]["errors"] += run.errors
        out[way].update({
            "window_s": round(run.window_s, 2),
            "starts_per_s": round(run.starts_per_s, 1),
            "stream_ms_p50": pct_ms([t.end - t.start for t in run.samples], 50),
            "cpu_percent_of_one_core": run.cpu_percent(),
            "client_loop_lag_ms": {"p50": pct_ms(run.lag_s, 50), "p99": pct_ms(run.lag_s, 99)},
        })
    return out


def _added(fig: dict[str, Any], key: str, p: int) -> object:
    return "" if fig[key] is None else fig[key][f"p{p}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Added TTFT and inter-token gap")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", default="1,10,50,200")
    parser.add_argument("--burst-levels", default="10,50,200",
                        help="burst mode (1 would repeat sustained level 1: sequential streams)")
    parser.add_argument("--slices", type=int, default=3, help="sustained: slices per way per level")
    parser.add_argument("--slice-s", type=float, default=2.0,
                        help="sustained: measured seconds per slice (level 1: 4/3 as many slices)")
    parser.add_argument("--ttft-s", type=float, default=0.05, help="simulator time to first token")
    parser.add_argument("--tps", type=float, default=50.0, help="simulator tokens per second")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--api-workers", type=int, default=1, help="API processes")
    parser.add_argument("--redis", choices=("tcp", "tls", "unix"), default="tcp",
                        help="how the router reaches its private Redis: plain TCP, TLS "
                             "(rediss://, a self-signed certificate) or a unix socket")
    parser.add_argument("--replica", action="store_true",
                        help="with a replica of the Redis: each acceptance waits for it (WAIT)")
    args = parser.parse_args(argv)
    if args.quick:
        levels, burst_levels, args.slices, args.slice_s = [1, 5], [5], 1, 0.6
    else:
        levels = [int(x) for x in args.levels.split(",")]
        burst_levels = [int(x) for x in args.burst_levels.split(",") if x]
    model = "gpt-4o-mini"
    nominal_s = args.ttft_s + (args.tokens - 1) / args.tps

    import tempfile
    from pathlib import Path

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-ttft-"))
    if args.redis == "tcp":
        redis_proc, redis_base = start_redis_server(workdir)
        redis_url = f"{redis_base}/0"
    else:
        redis_proc, tls_url, unix_url = start_tls_redis_server(workdir)
        redis_url = tls_url if args.redis == "tls" else unix_url
    replica = start_replica(redis_url, workdir) if args.replica else None
    sustained: dict[int, dict[str, ClosedLoopRun[StreamSample]]] = {}
    burst: dict[int, dict[str, list[StreamSample]]] = {}
    timings: dict[str, float] = {}
    try:
        with running_simulator(ttft_s=args.ttft_s, tokens_per_s=args.tps,
                               min_tokens=args.tokens, max_tokens=args.tokens) as sim_url:
            settings = Settings(redis_url=redis_url, key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING")
            stack = Stack(settings)
            try:
                api_url = stack.start_api(workers=args.api_workers)
                worker = stack.start_worker("stream")
                ways: dict[str, tuple[Way, str]] = {
                    "direct": (direct, sim_url),
                    "events": (events, api_url),
                    "drop-in": (dropin, api_url),
                }
                api_proc = next(p for p in stack.processes if p.name == "api")
                meter = CpuMeter({"api": api_proc.pid, "worker": worker.pid,
                                  "redis": redis_proc.pid})

                async def measure_all() -> None:
                    await run_burst(ways, 2, 1, model)  # warm-up
                    t0 = time.perf_counter()
                    duration_s = dict.fromkeys(ways, nominal_s)
                    for level in levels:
                        slices = args.slices if level > 1 else max(1, round(args.slices * 4 / 3))
                        sustained[level] = await run_sustained(
                            ways, level, model, slices=slices, slice_s=args.slice_s,
                            duration_s=duration_s, meter=meter)
                    t1 = time.perf_counter()
                    for level in burst_levels:
                        rounds = 1 if args.quick else max(2, min(10, 200 // level))
                        burst[level] = await run_burst(ways, level, rounds, model)
                    timings.update(sustained_s=round(t1 - t0, 1),
                                   burst_s=round(time.perf_counter() - t1, 1))

                run_fast(measure_all())
            finally:
                stack.stop()
    finally:
        if replica is not None:
            replica.stop()
        redis_proc.stop()

    sus_data = {str(level): sustained_figures(runs) for level, runs in sustained.items()}
    burst_data = {str(level): figures(by_way) for level, by_way in burst.items()}
    sus_rows, load_rows, burst_rows = [], [], []
    for level, by_way in sus_data.items():
        for way in WAYS:
            f = by_way[way]
            sus_rows.append([level, way, f["samples"], f["starts_per_s"],
                             *f["ttft_ms"].values(),
                             *(_added(f, "added_ttft_ms", p) for p in (50, 90, 99)),
                             f["gap_ms"]["p50"], f["gap_ms"]["p99"],
                             _added(f, "added_gap_ms", 99)])
            cpu = f["cpu_percent_of_one_core"]
            load_rows.append([level, way, f["errors"], f["stream_ms_p50"], cpu["client"],
                              f["client_loop_lag_ms"]["p99"], cpu["api"], cpu["worker"],
                              cpu["redis"], cpu["machine"]])
    for level, by_way in burst_data.items():
        for way in WAYS:
            f = by_way[way]
            burst_rows.append([level, way, f["samples"], *f["ttft_ms"].values(),
                               _added(f, "added_ttft_ms", 50), _added(f, "added_ttft_ms", 99),
                               f["gap_ms"]["p50"], f["gap_ms"]["p99"],
                               _added(f, "added_gap_ms", 99)])

    print(f"\nTTFT benchmark — simulator ttft {args.ttft_s*1000:.0f} ms, {args.tps:g} tok/s, "
          f"{args.tokens} tokens; times in ms; added = router percentile - direct percentile")
    print(f"\nSustained: N streams kept in flight per way (closed loop, starts spread over one "
          f"stream, ramp-up discarded), ways alternating in {args.slice_s:g} s slices "
          f"[{timings.get('sustained_s')} s]\n")
    print(table(["streams", "way", "n", "starts/s", "ttft p50", "p90", "p99", "added p50",
                 "added p90", "added p99", "gap p50", "gap p99", "added gap p99"], sus_rows))
    print("\nSustained, load over the measured windows (cpu in % of one core; machine max "
          f"{100 * (os.cpu_count() or 1)}%)\n")
    print(table(["streams", "way", "errors", "stream p50", "client cpu", "client lag p99",
                 "api cpu", "worker cpu", "redis cpu", "machine cpu"], load_rows))
    print(f"\nBurst: N started at the same instant, per way per round "
          f"(level 1 = sustained level 1: sequential streams) [{timings.get('burst_s')} s]\n")
    print(table(["streams", "way", "n", "ttft p50", "p90", "p99", "added p50", "added p99",
                 "gap p50", "gap p99", "added gap p99"], burst_rows))

    verdict: dict[str, bool] = {}
    target = sus_data.get(str(TARGET_LEVEL))
    print(f"\ntarget at {TARGET_LEVEL} sustained streams: added p50 <= {TARGET_P50_MS:g} ms, "
          f"added p99 <= {TARGET_P99_MS:g} ms")
    if target is None:
        print(f"  not measured in this run (levels {','.join(map(str, levels))})")
    for way in ("events", "drop-in") if target else ():
        added = target[way]["added_ttft_ms"]  # type: ignore[index]
        verdict[way] = bool(added["p50"] <= TARGET_P50_MS and added["p99"] <= TARGET_P99_MS
                            and target[way]["errors"] == 0)  # type: ignore[index]
        print(f"  {way}: added p50 {added['p50']:.1f} ms, p99 {added['p99']:.1f} ms -> "
              f"{'met' if verdict[way] else 'NOT met'}")
    name = ("ttft_quick" if args.quick else "ttft") + ("_replica" if args.replica else "")
    path = write_result(name if args.redis == "tcp" else f"{name}_{args.redis}", {
        "quick": args.quick, "sim": vars(args), "timings_s": timings,
        "sustained": sus_data, "burst": burst_data,
        "targets": {"level": TARGET_LEVEL, "mode": "sustained", "added_p50_ms": TARGET_P50_MS,
                    "added_p99_ms": TARGET_P99_MS},
        "target_met": verdict})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
