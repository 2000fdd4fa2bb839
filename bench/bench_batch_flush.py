"""Benchmark — one flush of 50,000 queued low requests: claim, JSONL, upload, submit.

Target: 50,000 requests claimed + written + uploaded + submitted in <= 3 s. Records are created
in bulk (pipelined CREATE scripts, as the intake would one by one), then the plain `flush()`
runs once against the simulator and its phases are timed. Peak memory of the flush process is
reported too (the JSONL is streamed to disk).

    python -m bench.bench_batch_flush            # 50,000
    python -m bench.bench_batch_flush --n 5000   # smoke size
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench.common import write_result
from router import events as ev
from router.keys import Keys
from router.ledger import Ledger
from router.records import RequestRecord, now
from router.store import StoreOps
from settings import Settings
from simulator.testing import running_simulator
from tests.support import start_redis_server
from workers.batch_flush import FlushContext, flush
from workers.batch_poll import PollContext, check_batch
from workers.upstream import make_openai_client


def create_many(client: redis.Redis, settings: Settings, n: int, chunk: int = 2000) -> None:
    ops = StoreOps(settings)
    script = None
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + chunk)):
            rec = RequestRecord(
                id=uuid.uuid4().hex, tenant="bench", priority="low", route="batch",
                status="queued", model="gpt-4o-mini", created_at=now(),
                body={"model": "gpt-4o-mini",
                      "messages": [{"role": "user", "content": f"bench prompt number {i}"}]},
            )
            op = ops.create(rec, [ev.accepted("batch", "low"), ev.queued()])
            script = op.script
            pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
        if script is not None:
            client.script_load(script.source)
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--writeback", action="store_true",
                        help="also time the poll's write-back of the finished batch")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-flush-"))
    redis_proc, redis_url = start_redis_server(workdir)
    try:
        with running_simulator(batch_turnaround_s=5 if args.writeback else 3600) as sim:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="benchflush",
                                upstream_base_url=sim, upstream_api_key="sk-bench",
                                batch_mode="native", log_format="json", log_level="WARNING")
            client = redis.Redis.from_url(settings.redis_url)
            t0 = time.perf_counter()
            create_many(client, settings, args.n)
            created_s = time.perf_counter() - t0
            ctx = FlushContext(settings, client, make_openai_client(settings))
            t1 = time.perf_counter()
            report = flush(ctx)
            flush_s = time.perf_counter() - t1
            keys = Keys(settings.key_prefix)
            submitted = report.submitted
            assert client.llen(keys.pending("gpt-4o-mini")) == 0
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            result: dict[str, object] = {
                "requests": args.n, "create_s": round(created_s, 3),
                "flush_s": round(flush_s, 3), "submitted": submitted,
                "batches": report.batches, "peak_rss_mb": round(peak_mb, 1),
                "target_s": 3.0, "met": flush_s <= 3.0 and submitted == args.n,
            }
            if args.writeback:
                poll_ctx = PollContext(settings, client, ctx.upstream)
                batch_id = report.batches[0]["batch_id"]
                while ctx.upstream.batches.retrieve(batch_id).status != "completed":
                    time.sleep(0.5)
                t2 = time.perf_counter()
                assert check_batch(poll_ctx, batch_id)
                result["writeback_s"] = round(time.perf_counter() - t2, 3)
                result["ledger_requests"] = Ledger.from_hash(
                    client.hgetall(keys.ledger())).total("batch").requests
            print(result)
            write_result("batch_flush", result)
    finally:
        redis_proc.stop()


if __name__ == "__main__":
    main()
