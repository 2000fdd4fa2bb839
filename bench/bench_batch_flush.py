"""Benchmark — the batch lane at 50,000 requests: one flush, then one write-back, with floors.

Target (issue 7): 50,000 queued requests claimed + written + uploaded + submitted in <= 3 s;
then their 50,000 results written back in <= 3 s; peak memory <= 256 MB for each.

Records are created in bulk (pipelined CREATE scripts, as the intake would one by one), then the
plain `flush()` runs once against the simulator and is timed; when the simulator has finished the
batch, the poll's `check_batch()` writes it back and is timed, and then once more to time the
idempotent re-run (nothing may move the second time). In the same run, on the same Redis and the
same output file, two floors are measured: a plain pipelined HSET of as many records with fields
of the same size as the write-back's, and streaming the output file and parsing each line with
orjson — what any write-back must at least pay. Figures from different runs are not comparable
on a shared machine; the ratios to the floors are.

Memory: the peak resident set size (VmHWM) of this process during each phase, with the peak reset
just before the phase (`/proc/self/clear_refs`), so an earlier phase cannot hide a later one; the
growth over the RSS at the phase's start is shown too. Where the reset is unavailable the figure
is `ru_maxrss` (a lifetime peak; then it can only overstate).

The write-back's results are checked too: every request completed, the ledger equal to the sum
of `hybrid_router.router.core.ledger.ledger_increments` over the output file (bit for bit), sampled records' costs
equal to `cost_of`, and one latency observation per request in the batch lane's histograms.

    python -m bench.bench_batch_flush              # 50,000, both phases
    python -m bench.bench_batch_flush --quick      # smoke size (bench/out/batch_flush_quick.json)
    python -m bench.bench_batch_flush --n 5000
    python -m bench.bench_batch_flush --flush-only # the flush alone (old default)
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import orjson
import redis
from redis.typing import EncodableT

from bench.common import table, write_result
from hybrid_router.router.core import events as ev
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger, ledger_increments
from hybrid_router.router.core.metrics import histograms_from_hash
from hybrid_router.router.core.records import RequestRecord, dumps, now
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.router.core.redis_text import text
from hybrid_router.router.core.store import StoreOps
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from hybrid_router.workers.batch.flush import FlushContext, flush
from hybrid_router.workers.batch.poll import PollContext, check_batch, write_back_batch
from hybrid_router.workers.batch.writeback import cost_of
from hybrid_router.workers.upstream.base import make_openai_client
from tests.support import start_redis_server

MODEL = "gpt-4o-mini"
TARGET_S = 3.0
TARGET_MB = 256.0
QUICK_N = 300


def create_many(client: redis.Redis, settings: Settings, n: int, chunk: int = 2000) -> None:
    ops = StoreOps(settings)
    script = None
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + chunk)):
            rec = RequestRecord(
                id=uuid.uuid4().hex, tenant="bench", priority="low", route="batch",
                status="queued", model=MODEL, created_at=now(),
                body={"model": MODEL,
                      "messages": [{"role": "user", "content": f"bench prompt number {i}"}]},
            )
            op = ops.create(rec, [ev.accepted("batch", "low"), ev.queued()])
            script = op.script
            pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
        if script is not None:
            client.script_load(script.source)
        pipe.execute()


# --- measuring -------------------------------------------------------------------------------
def _rss_kb(field_name: str) -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Phase:
    """One timed phase: wall seconds and the process's memory while it ran."""

    name: str
    requests: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_growth_mb: float = 0.0
    memory_source: str = ""
    process_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    target_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.target_s is None:
            return None
        return self.seconds <= self.target_s and self.peak_rss_mb <= TARGET_MB

    def row(self) -> list[Any]:
        per_request_us = self.seconds / self.requests * 1e6 if self.requests else 0.0
        met = "" if self.met is None else ("yes" if self.met else "NO")
        target = "" if self.target_s is None else f"<= {self.target_s:g} s, {TARGET_MB:g} MB"
        return [self.name, self.requests, round(self.seconds, 3), round(per_request_us, 1),
                round(self.process_cpu_s, 3), round(self.redis_cpu_s, 3),
                round(self.peak_rss_mb, 1), round(self.rss_growth_mb, 1), target, met]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "requests": self.requests, "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "rss_growth_mb": round(self.rss_growth_mb, 1),
                "memory_source": self.memory_source,
                "process_cpu_s": round(self.process_cpu_s, 3),
                "redis_cpu_s": round(self.redis_cpu_s, 3), "target_s": self.target_s,
                "met": self.met, **self.extra}


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds Redis's main thread has used (what runs commands and scripts)."""
    info = client.info("cpu")
    user = info.get("used_cpu_user_main_thread", info.get("used_cpu_user", 0.0))
    system = info.get("used_cpu_sys_main_thread", info.get("used_cpu_sys", 0.0))
    return float(user) + float(system)


@contextmanager
def measured(phase: Phase, client: redis.Redis) -> Iterator[Phase]:
    """Time the block; record this process's CPU and peak RSS, and Redis's CPU, while it ran.

    CPU figures say what bound the phase on a shared machine: wall time well above both means
    the process waited for a CPU (other load), not for its own work.
    """
    reset = _reset_peak()
    start_kb = _rss_kb("VmRSS") or 0
    redis_start = redis_cpu_s(client)
    cpu_start = time.process_time()
    t0 = time.perf_counter()
    try:
        yield phase
    finally:
        phase.seconds = time.perf_counter() - t0
        phase.process_cpu_s = time.process_time() - cpu_start
        phase.redis_cpu_s = redis_cpu_s(client) - redis_start
        peak_kb = _rss_kb("VmHWM") if reset else None
        if peak_kb is not None:
            phase.memory_source = "VmHWM (peak reset before the phase)"
        else:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            phase.memory_source = "ru_maxrss (process lifetime peak)"
        phase.peak_rss_mb = peak_kb / 1024
        phase.rss_growth_mb = max(peak_kb - start_kb, 0) / 1024


# --- floors ----------------------------------------------------------------------------------
def floor_hset(client: redis.Redis, keys: Keys, n: int, sample: dict[str, str],
               chunk: int = 2000) -> None:
    """A plain pipelined HSET of `n` records with the write-back's fields (then deleted)."""
    mapping: dict[EncodableT, EncodableT] = {}
    mapping.update(sample)
    for start in range(0, n, chunk):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + chunk)):
            pipe.hset(keys.record(f"floor-{i}"), mapping=mapping)
        pipe.execute()
    for start in range(0, n, chunk):
        client.delete(*[keys.record(f"floor-{i}") for i in range(start, min(n, start + chunk))])


def floor_parse(upstream: openai.OpenAI, file_id: str) -> int:
    """Stream the output file and parse each line with orjson; the number of lines."""
    lines = 0
    with upstream.files.with_streaming_response.content(file_id) as response:
        for line in response.iter_lines():
            if line:
                orjson.loads(line)
                lines += 1
    return lines


# --- checking the write-back -----------------------------------------------------------------
def check_results(client: redis.Redis, settings: Settings, upstream: openai.OpenAI,
                  file_id: str, n: int, sample_size: int = 200) -> dict[str, Any]:
    """What the write-back wrote equals what the reference functions compute."""
    keys = Keys(settings.key_prefix)
    expected: dict[str, int] = {}
    samples: list[tuple[str, dict[str, Any] | None]] = []
    with upstream.files.with_streaming_response.content(file_id) as response:
        for line in response.iter_lines():
            if not line:
                continue
            obj = orjson.loads(line)
            usage = obj["response"]["body"].get("usage")
            for name, amount in ledger_increments(settings, "batch", MODEL, usage)[1].items():
                if amount:
                    expected[name] = expected.get(name, 0) + amount
            if len(samples) < sample_size:
                samples.append((obj["custom_id"], usage))
    ledger = {text(k): int(v) for k, v in client.hgetall(keys.ledger()).items()}
    assert ledger == expected, f"ledger differs from ledger_increments: {ledger} != {expected}"
    for request_id, usage in samples:
        raw = client.hmget(keys.record(request_id), "status", "cost_usd")
        assert text(raw[0]) == "completed", (request_id, raw)
        assert text(raw[1]) == str(cost_of(settings, MODEL, usage)), (request_id, raw, usage)
    hists = histograms_from_hash(client.hgetall(keys.timings("batch")))
    assert hists["e2e"].count == n, f"{hists['e2e'].count} latency observations for {n}"
    total = Ledger.from_hash(client.hgetall(keys.ledger())).total("batch")
    assert total.requests == n, f"ledger counts {total.requests} of {n}"
    return {"ledger_requests": total.requests, "ledger_cost_usd": str(total.cost_usd),
            "ledger_equals_reference": True, "latency_observations": hists["e2e"].count,
            "sampled_costs_equal": len(samples)}


def _wait(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the simulator did not finish the batch in time")
        time.sleep(0.2)


# --- the run ---------------------------------------------------------------------------------
def run(n: int, writeback: bool) -> tuple[list[Phase], dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-flush-"))
    redis_proc, redis_url = start_redis_server(workdir)
    phases: list[Phase] = []
    info: dict[str, Any] = {}
    try:
        turnaround = 2.0 if writeback else 3600.0
        with running_simulator(batch_turnaround_s=turnaround) as sim:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="benchflush",
                                upstream_base_url=sim, upstream_api_key="sk-bench",
                                batch_mode="native", log_format="json", log_level="WARNING")
            client = sync_client(settings.redis_url)
            keys = Keys(settings.key_prefix)
            t0 = time.perf_counter()
            create_many(client, settings, n)
            info["create_s"] = round(time.perf_counter() - t0, 3)
            ctx = FlushContext(settings, client, make_openai_client(settings))

            flush_phase = Phase("flush: claim, JSONL, upload, submit", n, target_s=TARGET_S)
            with measured(flush_phase, client):
                report = flush(ctx)
            phases.append(flush_phase)
            assert report.submitted == n, f"submitted {report.submitted} of {n}"
            assert client.llen(keys.pending(MODEL)) == 0
            info["batches"] = report.batches
            if not writeback:
                return phases, info

            batch_id = str(report.batches[0]["batch_id"])
            _wait(lambda: ctx.upstream.batches.retrieve(batch_id).status == "completed",
                  60 + n / 1000)
            batch = ctx.upstream.batches.retrieve(batch_id)
            output_file = str(batch.output_file_id)
            poll_ctx = PollContext(settings, client, ctx.upstream)

            with measured(Phase("write-back: download, parse, finish, ledger, events",
                                n, target_s=TARGET_S), client) as wb_phase:
                assert check_batch(poll_ctx, batch_id)
            phases.append(wb_phase)
            with measured(Phase("write-back again (idempotent, nothing moves)", n),
                          client) as again:
                second = write_back_batch(poll_ctx, batch_id, MODEL, batch)
            phases.append(again)
            assert second.completed == second.failed == second.requeued == 0, second
            assert second.unchanged == n, second

            sample = client.hgetall(keys.record(_first_member(client, keys, batch_id)))
            fields = {text(k): text(v) for k, v in sample.items()
                      if text(k) in ("result", "cost_usd", "finished_at", "usage", "status")}
            with measured(Phase("floor: pipelined HSET of as many records", n),
                          client) as hset:
                floor_hset(client, keys, n, fields)
            phases.append(hset)
            with measured(Phase("floor: stream the output file + orjson each line", n),
                          client) as parse:
                lines = floor_parse(ctx.upstream, output_file)
            phases.append(parse)
            assert lines == n, f"{lines} lines for {n} requests"
            info["floor_s"] = round(hset.seconds + parse.seconds, 3)
            info["writeback_over_floor"] = round(wb_phase.seconds / (hset.seconds
                                                                     + parse.seconds), 2)
            info["checks"] = check_results(client, settings, ctx.upstream, output_file, n)
            info["result_sample_bytes"] = len(dumps(fields))
    finally:
        redis_proc.stop()
    return phases, info


def _first_member(client: redis.Redis, keys: Keys, batch_id: str) -> str:
    return text(client.srandmember(keys.batch_requests(batch_id)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Batch lane: flush and write-back of N requests")
    parser.add_argument("--n", type=int, default=50_000, help="requests (default 50,000)")
    parser.add_argument("--quick", action="store_true", help=f"smoke size ({QUICK_N} requests)")
    parser.add_argument("--writeback", action="store_true",
                        help="kept for old scripts: the write-back is now measured by default")
    parser.add_argument("--flush-only", action="store_true", help="measure the flush alone")
    args = parser.parse_args(argv)
    n = QUICK_N if args.quick else args.n
    phases, info = run(n, writeback=not args.flush_only)

    print(f"Batch lane benchmark: {n:,} requests "
          f"(targets <= {TARGET_S:g} s and <= {TARGET_MB:g} MB per phase)")
    print(table(["phase", "requests", "seconds", "us/request", "our CPU s", "redis CPU s",
                 "peak RSS MB", "RSS growth MB", "target", "met"], [p.row() for p in phases]))
    if "floor_s" in info:
        print(f"write-back / floor (HSET + parse): {info['writeback_over_floor']}x "
              f"({info['floor_s']} s floor)")
        print(f"checks: {info['checks']}")
    print(f"memory: {phases[0].memory_source}; records created in {info['create_s']} s")
    result: dict[str, Any] = {
        "quick": args.quick, "requests": n, "target_s": TARGET_S, "target_mb": TARGET_MB,
        "phases": [p.as_dict() for p in phases], **info,
        "met": all(p.met for p in phases if p.met is not None),
    }
    path = write_result("batch_flush_quick" if args.quick else "batch_flush", result)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
