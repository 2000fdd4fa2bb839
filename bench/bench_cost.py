"""Benchmark 5 — cost: a mixed workload's ledger against the same tokens all streamed.

Part A (lanes) runs a mixed workload (low and high requests) through the whole router (API,
stream worker, batch worker, beat, simulator with fast batches), waits until every request is
terminal, then compares the ledger's cost with what the same tokens cost at the standard price
(the cost of a direct client streaming everything). The savings must equal the batch lane's
share of the standard cost times the batch discount, exactly, and the ledger must equal the sum
of the per-request costs on the records.

Part B (tiers) runs 20 % high (at the priority tier), 50 % normal (no deadline: flex) and 30 %
low with deadlines (half a day: batch; five minutes: flex) on models with flex and priority
prices, and compares the router's cost with the same tokens all at the standard tier and all
at the priority tier, computed exactly from each request's usage in the same run.

    python -m bench.bench_cost            # A: 400 low + 100 high; B: 500 mixed
    python -m bench.bench_cost --quick    # smoke size
    python -m bench.bench_cost --part tiers
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import table, write_result
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.pricing import cost_usd
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server

API_KEY = "bench-key"


async def submit_all(api_url: str, n_low: int, n_high: int) -> list[str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    sem = asyncio.Semaphore(32)
    models = ["gpt-4o-mini", "gpt-4o"]

    async def one(client: httpx.AsyncClient, i: int, priority: str) -> str:
        body = {"model": models[i % 2], "priority": priority,
                "messages": [{"role": "user", "content": f"cost bench {priority} {i} {uuid.uuid4().hex}"}]}
        async with sem:
            resp = await client.post(f"{api_url}/v1/requests", json=body, headers=headers)
            resp.raise_for_status()
            return str(resp.json()["id"])

    async with httpx.AsyncClient(timeout=30) as client:
        jobs = [one(client, i, "low") for i in range(n_low)]
        jobs += [one(client, i, "high") for i in range(n_high)]
        return list(await asyncio.gather(*jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ledger cost against all-streamed cost")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--low", type=int, default=400)
    parser.add_argument("--high", type=int, default=100)
    parser.add_argument("--mixed", type=int, default=500, help="requests of part B (tiers)")
    parser.add_argument("--part", choices=("lanes", "tiers", "both"), default="both")
    args = parser.parse_args(argv)
    ok = True
    if args.part in ("lanes", "both"):
        ok = run_lanes(args) == 0 and ok
    if args.part in ("tiers", "both"):
        ok = run_tiers(args) == 0 and ok
    return 0 if ok else 1


def run_lanes(args: argparse.Namespace) -> int:
    n_low, n_high = (12, 4) if args.quick else (args.low, args.high)

    with running_router() as (settings, api_url):
        t0 = time.perf_counter()
        ids = asyncio.run(submit_all(api_url, n_low, n_high))
        records, ledger = finished(settings, ids)
        elapsed = time.perf_counter() - t0

    not_done = [r.id for r in records if not r.terminal]
    completed = [r for r in records if r.status == "completed"]
    by_route = {route: sum((r.cost_usd or Decimal(0) for r in completed if r.route == route),
                           Decimal(0)) for route in ("stream", "batch")}
    total = ledger.total()
    batch = ledger.total("batch")
    stream = ledger.total("stream")
    expected_savings = batch.standard_cost_usd * settings.batch_discount
    exact = total.savings_usd == expected_savings
    ledger_matches = by_route["batch"] == batch.cost_usd and by_route["stream"] == stream.cost_usd
    rows = [
        ["direct client (all streamed, standard price)", total.requests,
         total.prompt_tokens + total.completion_tokens, f"{total.standard_cost_usd:.10f}"],
        ["router (stream + batch lanes)", total.requests,
         total.prompt_tokens + total.completion_tokens, f"{total.cost_usd:.10f}"],
    ]
    print(f"\nCost benchmark — {n_low} low + {n_high} high requests, {elapsed:.1f}s end to end\n")
    print(table(["way", "requests", "tokens", "cost USD"], rows))
    share = (batch.standard_cost_usd / total.standard_cost_usd) if total.standard_cost_usd else 0
    print(f"\nsavings {total.savings_usd:.12f} USD = batch share {share:.4f} x discount "
          f"{settings.batch_discount} x standard {total.standard_cost_usd:.12f}: exact={exact}")
    print(f"ledger equals the sum of per-request costs: {ledger_matches}; "
          f"not terminal: {len(not_done)}")
    path = write_result("cost_quick" if args.quick else "cost", {
        "quick": args.quick, "low": n_low, "high": n_high, "elapsed_s": elapsed,
        "standard_cost_usd": str(total.standard_cost_usd), "router_cost_usd": str(total.cost_usd),
        "savings_usd": str(total.savings_usd), "expected_savings_usd": str(expected_savings),
        "savings_exact": exact, "ledger_matches_records": ledger_matches,
        "not_terminal": len(not_done), "ledger": ledger.as_dict(),
    })
    print(f"written: {path}")
    return 0 if exact and ledger_matches and not not_done else 1


@contextlib.contextmanager
def running_router(**overrides: Any) -> Iterator[tuple[Settings, str]]:
    """The whole router (API, both workers, beat) on a private Redis and simulator with fast
    batches; yields its settings and API URL."""
    redis_proc, redis_url = start_redis_server(Path(tempfile.mkdtemp(prefix="hr-bench-cost-")))
    try:
        with running_simulator(batch_turnaround_s=0.5) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING",
                                flush_interval_s=1.0, poll_interval_s=0.5, batch_mode="native",
                                **overrides)
            with Stack(settings) as stack:
                api_url = stack.start_api()
                stack.start_worker("stream")
                stack.start_worker("batch")
                stack.start_beat()
                yield settings, api_url
    finally:
        redis_proc.stop()


def finished(settings: Settings, ids: list[str], timeout_s: float = 240
             ) -> tuple[list[RequestRecord], Ledger]:
    """The records of `ids` once all are terminal (or as they are after `timeout_s`), and the
    ledger then."""
    client = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    deadline = time.monotonic() + timeout_s
    records: list[RequestRecord] = []
    try:
        while time.monotonic() < deadline:
            pipe = client.pipeline(transaction=False)
            for rid in ids:
                pipe.hgetall(keys.record(rid))
            records = [RequestRecord.from_hash(raw) for raw in pipe.execute()]
            if all(r.terminal for r in records):
                break
            time.sleep(0.5)
        return records, Ledger.from_hash(client.hgetall(keys.ledger()))
    finally:
        client.close()


# Part B's mix: (share of requests, priority, deadline_s or None).
TIER_MIX: list[tuple[float, str, float | None]] = [
    (0.20, "high", None), (0.50, "normal", None), (0.15, "low", 43_200.0), (0.15, "low", 300.0)]
TIER_MODELS = ["gpt-5-mini", "gpt-5"]


def tier_plan(n: int) -> list[tuple[str, float | None]]:
    """`n` (priority, deadline) pairs in the mix's shares, interleaved."""
    counts = [round(share * n) for share, _p, _d in TIER_MIX]
    counts[1] += n - sum(counts)
    plan: list[tuple[str, float | None]] = []
    for count, (_share, priority, deadline) in zip(counts, TIER_MIX, strict=True):
        plan += [(priority, deadline)] * count
    return plan[::2] + plan[1::2]


async def submit_plan(api_url: str, plan: list[tuple[str, float | None]]) -> list[str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    sem = asyncio.Semaphore(32)

    async def one(client: httpx.AsyncClient, i: int, priority: str,
                  deadline: float | None) -> str:
        body: dict[str, object] = {
            "model": TIER_MODELS[i % 2], "priority": priority,
            "messages": [{"role": "user", "content": f"tier bench {i} {uuid.uuid4().hex}"}]}
        if deadline is not None:
            body["deadline_s"] = deadline
        async with sem:
            resp = await client.post(f"{api_url}/v1/requests", json=body, headers=headers)
            resp.raise_for_status()
            return str(resp.json()["id"])

    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*[one(client, i, p, d)
                                           for i, (p, d) in enumerate(plan)]))


def run_tiers(args: argparse.Namespace) -> int:
    n = 20 if args.quick else args.mixed
    plan = tier_plan(n)
    with running_router(priority_tier_models=["*"]) as (settings, api_url):
        t0 = time.perf_counter()
        ids = asyncio.run(submit_plan(api_url, plan))
        records, ledger = finished(settings, ids)
        elapsed = time.perf_counter() - t0

    not_done = [r.id for r in records if not r.terminal]
    completed = [r for r in records if r.status == "completed"]

    def usage(r: RequestRecord) -> dict[str, int]:
        return r.usage.model_dump() if r.usage is not None else {}

    all_standard = sum((cost_usd(settings, r.model, usage(r), "stream", tier="default")
                        for r in completed), Decimal(0))
    all_priority = sum((cost_usd(settings, r.model, usage(r), "stream", tier="priority")
                        for r in completed), Decimal(0))
    by_lane: dict[tuple[str, str], tuple[int, Decimal]] = {}
    for r in completed:
        tier = r.served_tier or ("batch" if r.route == "batch" else "default")
        count, cost = by_lane.get((r.route, tier), (0, Decimal(0)))
        by_lane[(r.route, tier)] = (count + 1, cost + (r.cost_usd or Decimal(0)))
    total = ledger.total()
    records_cost = sum((r.cost_usd or Decimal(0) for r in completed), Decimal(0))
    lines_match = all(ledger.total(lane, tier).cost_usd == cost and
                      ledger.total(lane, tier).requests == count
                      for (lane, tier), (count, cost) in by_lane.items())
    exact = (total.cost_usd == records_cost and total.standard_cost_usd == all_standard
             and lines_match)
    tokens = total.prompt_tokens + total.completion_tokens
    rows = [
        ["all at the standard tier (direct client)", len(completed), tokens,
         f"{all_standard:.12f}", "1.000"],
        ["all at the priority tier", len(completed), tokens, f"{all_priority:.12f}",
         f"{all_priority / all_standard:.3f}" if all_standard else "-"],
        ["router (batch + flex + stream/priority)", total.requests, tokens,
         f"{total.cost_usd:.12f}",
         f"{total.cost_usd / all_standard:.3f}" if all_standard else "-"],
    ]
    mix = ", ".join(f"{share:.0%} {p}" + (f" (deadline {d:g}s)" if d else "")
                    for share, p, d in TIER_MIX)
    print(f"\nCost benchmark, tiers — {len(plan)} requests ({mix}), models "
          f"{' / '.join(TIER_MODELS)}, {elapsed:.1f}s end to end\n")
    print(table(["way", "requests", "tokens", "cost USD", "x standard"], rows))
    print("\nby lane and served tier:")
    print(table(["lane", "tier", "requests", "cost USD"],
                [[lane, tier, count, f"{cost:.12f}"]
                 for (lane, tier), (count, cost) in sorted(by_lane.items())]))
    print(f"\nsavings against all-standard {all_standard - total.cost_usd:.12f} USD, against "
          f"all-priority {all_priority - total.cost_usd:.12f} USD; ledger equals the records "
          f"per lane and tier and its standard cost equals all-standard: exact={exact}; "
          f"not terminal: {len(not_done)}")
    path = write_result("cost_tiers_quick" if args.quick else "cost_tiers", {
        "quick": args.quick, "requests": len(plan), "mix": mix, "elapsed_s": elapsed,
        "all_standard_usd": str(all_standard), "all_priority_usd": str(all_priority),
        "router_cost_usd": str(total.cost_usd), "exact": exact,
        "by_lane_tier": {f"{lane}/{tier}": {"requests": c, "cost_usd": str(v)}
                         for (lane, tier), (c, v) in sorted(by_lane.items())},
        "not_terminal": len(not_done), "ledger": ledger.as_dict(),
    })
    print(f"written: {path}")
    return 0 if exact and not not_done else 1


if __name__ == "__main__":
    sys.exit(main())
