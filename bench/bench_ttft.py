"""Benchmark 1 — added time to first token and added gap between tokens.

Same client (bench.sseclient, a lean socket-level client, so the client's own CPU does not
dominate at 200 streams), same simulator (fixed timing), same run, at 1/10/50/200 concurrent streams:
  * direct:  the client streams ``/v1/chat/completions`` from the simulator itself;
  * events:  ``POST /v1/requests`` (high) to the router, then its SSE ``/events``;
  * drop-in: ``POST /v1/chat/completions`` (stream) to the router.
Reported: p50/p90/p99 of TTFT per way, the router's added TTFT (router percentile minus direct
percentile), and the inter-token gap percentiles.

    python -m bench.bench_ttft            # full run (a few minutes)
    python -m bench.bench_ttft --quick    # smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

from bench.common import percentile, table, write_result
from bench.sseclient import request_json, stream_lines
from settings import Settings
from simulator.testing import running_simulator
from tests.support import Stack, start_redis_server

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
    async for line in stream_lines(f"{api_url}/v1/requests/{request_id}/events", method="GET",
                                   headers=headers):
        if not line.startswith(b"data: "):
            continue
        event = orjson.loads(line[6:])
        if event["type"] == "token":
            sample.token()
        elif event["type"] in ("done", "error", "cancelled"):
            break
    return sample


Way = Callable[[str, str], Awaitable[StreamSample]]


async def run_level(ways: dict[str, tuple[Way, str]], concurrency: int, rounds: int,
                    model: str) -> dict[str, list[StreamSample]]:
    """`rounds` rounds; in each, every way runs `concurrency` streams at once (interleaved)."""
    out: dict[str, list[StreamSample]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, (fn, base) in ways.items():
            samples = await asyncio.gather(*(fn(base, model) for _ in range(concurrency)))
            out[name].extend(samples)
    return out


def pct_ms(values: list[float], p: float) -> float:
    return round(percentile(values, p) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Added TTFT and inter-token gap")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", default="1,10,50,200")
    parser.add_argument("--ttft-s", type=float, default=0.05, help="simulator time to first token")
    parser.add_argument("--tps", type=float, default=50.0, help="simulator tokens per second")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--api-workers", type=int, default=1, help="API processes")
    args = parser.parse_args(argv)
    levels = [1, 5] if args.quick else [int(x) for x in args.levels.split(",")]
    model = "gpt-4o-mini"

    import tempfile
    from pathlib import Path

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-ttft-"))
    redis_proc, redis_url = start_redis_server(workdir)
    results: dict[int, dict[str, list[StreamSample]]] = {}
    try:
        with running_simulator(ttft_s=args.ttft_s, tokens_per_s=args.tps,
                               min_tokens=args.tokens, max_tokens=args.tokens) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING")
            stack = Stack(settings)
            try:
                api_url = stack.start_api(workers=args.api_workers)
                stack.start_worker("stream")
                ways: dict[str, tuple[Way, str]] = {
                    "direct": (direct, sim_url),
                    "events": (events, api_url),
                    "drop-in": (dropin, api_url),
                }
                asyncio.run(run_level(ways, 2, 1, model))  # warm-up
                for level in levels:
                    rounds = 2 if args.quick else max(2, min(20, 400 // level))
                    results[level] = asyncio.run(run_level(ways, level, rounds, model))
            finally:
                stack.stop()
    finally:
        redis_proc.stop()

    rows = []
    data: dict[str, object] = {}
    for level, by_way in results.items():
        direct_ttft = [s.ttft_s for s in by_way["direct"]]
        direct_gaps = [g for s in by_way["direct"] for g in s.gaps_s]
        for way in ("direct", "events", "drop-in"):
            ttft = [s.ttft_s for s in by_way[way]]
            gaps = [g for s in by_way[way] for g in s.gaps_s]
            added = {p: round(pct_ms(ttft, p) - pct_ms(direct_ttft, p), 3) for p in (50, 90, 99)}
            added_gap = {p: round(pct_ms(gaps, p) - pct_ms(direct_gaps, p), 3) for p in (50, 99)}
            rows.append([level, way, len(ttft), pct_ms(ttft, 50), pct_ms(ttft, 90), pct_ms(ttft, 99),
                         "" if way == "direct" else added[50], "" if way == "direct" else added[99],
                         pct_ms(gaps, 50), pct_ms(gaps, 99),
                         "" if way == "direct" else added_gap[99]])
            data[f"{level}/{way}"] = {
                "samples": len(ttft),
                "ttft_ms": {f"p{p}": pct_ms(ttft, p) for p in (50, 90, 99)},
                "added_ttft_ms": added if way != "direct" else None,
                "gap_ms": {f"p{p}": pct_ms(gaps, p) for p in (50, 90, 99)},
                "added_gap_ms": added_gap if way != "direct" else None,
                "tokens_per_stream": round(sum(s.tokens for s in by_way[way]) / max(1, len(ttft)), 1),
            }
    print(f"\nTTFT benchmark — simulator ttft {args.ttft_s*1000:.0f} ms, {args.tps:g} tok/s, "
          f"{args.tokens} tokens\n")
    print(table(["streams", "way", "n", "ttft p50", "p90", "p99", "added p50", "added p99",
                 "gap p50", "gap p99", "added gap p99"], rows))
    print(f"\ntargets at 50 streams: added p50 <= {TARGET_P50_MS} ms, added p99 <= {TARGET_P99_MS} ms")
    path = write_result("ttft_quick" if args.quick else "ttft", {"quick": args.quick, "sim": vars(args), "levels": data,
                                 "targets": {"added_p50_ms": TARGET_P50_MS,
                                             "added_p99_ms": TARGET_P99_MS}})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
