"""Benchmark 5 — cost: a mixed workload's ledger against the same tokens all streamed.

Runs a mixed workload (low and high requests) through the whole router (API, stream worker,
batch worker, beat, simulator with fast batches), waits until every request is terminal, then
compares the ledger's cost with what the same tokens cost at the standard price (the cost of a
direct client streaming everything). The savings must equal the batch lane's share of the
standard cost times the batch discount, exactly, and the ledger must equal the sum of the
per-request costs on the records.

    python -m bench.bench_cost            # 400 low + 100 high
    python -m bench.bench_cost --quick    # smoke size
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import redis

from bench.common import table, write_result
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
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
    args = parser.parse_args(argv)
    n_low, n_high = (12, 4) if args.quick else (args.low, args.high)

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-cost-"))
    redis_proc, redis_url = start_redis_server(workdir)
    try:
        with running_simulator(batch_turnaround_s=0.5) as sim_url:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING",
                                flush_interval_s=1.0, poll_interval_s=0.5, batch_mode="native")
            stack = Stack(settings)
            try:
                api_url = stack.start_api()
                stack.start_worker("stream")
                stack.start_worker("batch")
                stack.start_beat()
                t0 = time.perf_counter()
                ids = asyncio.run(submit_all(api_url, n_low, n_high))
                client = redis.Redis.from_url(settings.redis_url)
                keys = Keys(settings.key_prefix)
                deadline = time.monotonic() + 240
                records: list[RequestRecord] = []
                while time.monotonic() < deadline:
                    pipe = client.pipeline(transaction=False)
                    for rid in ids:
                        pipe.hgetall(keys.record(rid))
                    records = [RequestRecord.from_hash(raw) for raw in pipe.execute()]
                    if all(r.terminal for r in records):
                        break
                    time.sleep(0.5)
                elapsed = time.perf_counter() - t0
                ledger = Ledger.from_hash(client.hgetall(keys.ledger()))
            finally:
                stack.stop()
    finally:
        redis_proc.stop()

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


if __name__ == "__main__":
    sys.exit(main())
