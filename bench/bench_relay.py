"""Benchmark 2 — token relay: throughput end to end, and streams one worker process sustains.

A. Throughput: K concurrent high requests whose upstream answers as fast as it can; the
   subscriber is one pattern subscription on the request channels (the cheapest way to read
   them). Reported: tokens/s delivered to subscribers, against a direct client reading the same
   number of streams from the simulator in the same run.
B. Capacity: streams at 30 tokens/s each, at rising concurrency, through ONE stream worker
   process; the added inter-token gap (router gap p99 minus direct gap p99 at the same level)
   is reported per level; capacity is the highest level with added p99 <= 50 ms.

    python -m bench.bench_relay            # full run (a few minutes)
    python -m bench.bench_relay --quick    # smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson
import redis.asyncio as aioredis

from bench.common import percentile, table, write_result
from bench.sseclient import stream_lines
from router.keys import Keys
from settings import Settings
from simulator.testing import running_simulator
from tests.support import Stack, start_redis_server

API_KEY = "bench-key"
TARGET_TOKENS_PER_S = 10_000
TARGET_STREAMS = 300
GAP_LIMIT_MS = 50.0


async def _direct_stream(sim_url: str, tokens: int, tps: float) -> tuple[int, list[float]]:
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user",
                          "content": f"[[sim:tokens={tokens}]][[sim:tps={tps:g}]] {uuid.uuid4().hex}"}]}
    count, gaps, last = 0, [], 0.0
    async for line in stream_lines(f"{sim_url}/chat/completions", json=body,
                                   headers={"Authorization": "Bearer sk-bench"}):
        if not line.startswith(b"data: {"):
            continue
        choices = orjson.loads(line[6:]).get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.perf_counter()
            if count:
                gaps.append(now - last)
            last = now
            count += 1
    return count, gaps


async def direct_run(sim_url: str, streams: int, tokens: int, tps: float
                     ) -> tuple[float, int, list[float]]:
    """The same streams read straight from the simulator (lean client, see bench.sseclient)."""
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_direct_stream(sim_url, tokens, tps) for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    total = sum(c for c, _ in res)
    return elapsed, total, [g for _, gaps in res for g in gaps]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Token relay throughput and capacity")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=100, help="A: concurrent streams")
    parser.add_argument("--tokens", type=int, default=400, help="A: tokens per stream")
    parser.add_argument("--levels", default="50,100,200,300,400", help="B: concurrency levels")
    args = parser.parse_args(argv)
    streams_a, tokens_a = (10, 50) if args.quick else (args.streams, args.tokens)
    levels = [5, 10] if args.quick else [int(x) for x in args.levels.split(",")]
    tokens_b, tps_b = (10, 30.0) if args.quick else (60, 30.0)

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-relay-"))
    redis_proc, redis_url = start_redis_server(workdir)
    data: dict[str, object] = {}
    rows_a: list[list[object]] = []
    rows_b: list[list[object]] = []
    capacity = 0
    capacity_open = True
    try:
        with running_simulator(ttft_s=0.0, tokens_per_s=0.0) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING",
                                stream_worker_concurrency=max(512, max(levels) + 50))
            stack = Stack(settings)
            try:
                api_url = stack.start_api()
                stack.start_worker("stream")
                asyncio.run(router_run(api_url, settings, 2, 10, 0))  # warm-up
                d_el, d_tok, _ = asyncio.run(direct_run(sim_url, streams_a, tokens_a, 0))
                r_el, r_tok, _, r_events = asyncio.run(
                    router_run(api_url, settings, streams_a, tokens_a, 0))
                rows_a = [["direct from simulator", streams_a, d_tok, round(d_el, 2),
                           round(d_tok / d_el)],
                          ["router, pattern subscriber", streams_a, r_tok, round(r_el, 2),
                           round(r_tok / r_el)]]
                data["throughput"] = {"streams": streams_a, "tokens_per_stream": tokens_a,
                                      "direct_tokens_per_s": d_tok / d_el,
                                      "router_tokens_per_s": r_tok / r_el,
                                      "router_token_events": r_events}
                for level in levels:
                    _, _, d_gaps = asyncio.run(direct_run(sim_url, level, tokens_b, tps_b))
                    _, _, r_gaps, _ = asyncio.run(
                        router_run(api_url, settings, level, tokens_b, tps_b))
                    d99 = percentile(d_gaps, 99) * 1000
                    r99 = percentile(r_gaps, 99) * 1000
                    added = r99 - d99
                    if added <= GAP_LIMIT_MS and capacity_open:
                        capacity = level
                    else:
                        capacity_open = False  # capacity is the last level before a failure
                    rows_b.append([level, round(percentile(d_gaps, 50) * 1000, 2), round(d99, 2),
                                   round(percentile(r_gaps, 50) * 1000, 2), round(r99, 2),
                                   round(added, 2), "ok" if added <= GAP_LIMIT_MS else "over"])
                    data[f"capacity/{level}"] = {"direct_gap_p99_ms": d99, "router_gap_p99_ms": r99,
                                                 "added_gap_p99_ms": added}
            finally:
                stack.stop()
    finally:
        redis_proc.stop()

    print("\nA. Relay throughput (upstream as fast as it can)\n")
    print(table(["way", "streams", "tokens", "seconds", "tokens/s"], rows_a))
    print(f"\nB. One stream worker, streams at {tps_b:g} tokens/s each\n")
    print(table(["streams", "direct gap p50", "direct p99", "router gap p50", "router p99",
                 "added p99", f"<= {GAP_LIMIT_MS:g} ms"], rows_b))
    print(f"\ncapacity: {capacity} concurrent streams (target >= {TARGET_STREAMS}); "
          f"throughput target >= {TARGET_TOKENS_PER_S:,} tokens/s")
    data["capacity_streams"] = capacity
    path = write_result("relay_quick" if args.quick else "relay", {"quick": args.quick, **data,
                                  "targets": {"tokens_per_s": TARGET_TOKENS_PER_S,
                                              "streams": TARGET_STREAMS}})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
