"""Benchmark 7 — Redis work per request: how far one Redis goes (issue 21).

Counts, not timings (so it means the same on a busy machine): a whole deployment (a private
redis-server, the API, a stream worker, a batch worker, beat, the simulator) serves N streamed
requests of T tokens at a realistic pace, then N low requests through the batch lane; for each
lane the Redis commands executed (``INFO commandstats``, commands run inside Lua scripts
included), of which script calls (EVALSHA), per token and per request, and Redis' own CPU per
request (``used_cpu_sys + used_cpu_user``). Background work (beat's ticks, housekeeping, polls, the
Celery consumers' polling) over the same time is included: a deployment pays it too, but it is
per second, not per request, so the more requests a run has, the less of it each one carries.

    python -m bench.bench_redis_ops            # 100 streams of 200 tokens, 500 low requests
    python -m bench.bench_redis_ops --quick    # smoke size
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import table, write_result
from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server, wait_until

MODEL = "gpt-4o-mini"
# The calls that run a script (Redis also counts each command the script runs).
SCRIPT_RUNNERS = ("evalsha", "eval", "fcall")


def snapshot(client: redis.Redis) -> dict[str, float]:
    stats: dict[str, Any] = client.info("commandstats")
    cpu: dict[str, Any] = client.info("cpu")
    out = {name.removeprefix("cmdstat_"): float(v["calls"]) for name, v in stats.items()}
    out["_cpu_s"] = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def terminal(client: redis.Redis, keys: Keys, ids: list[str]) -> bool:
    """Every request finished (read straight from Redis: polling through the API would add its
    own commands to what is counted)."""
    pipe = client.pipeline(transaction=False)
    for rid in ids:
        pipe.hget(keys.record(rid), "status")
    return all(s in (b"completed", b"failed", b"cancelled") for s in pipe.execute())


def submit(api: str, priority: str, content: str) -> str:
    response = httpx.post(f"{api}/v1/requests", timeout=30, json={
        "model": MODEL, "priority": priority, "messages": [{"role": "user", "content": content}]})
    response.raise_for_status()
    return str(response.json()["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--tps", type=float, default=40.0, help="tokens/s of each stream")
    parser.add_argument("--low", type=int, default=500)
    args = parser.parse_args(argv)
    streams, tokens, low = (10, 50, 40) if args.quick else (args.streams, args.tokens, args.low)

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-ops-"))
    redis_proc, redis_url = start_redis_server(workdir)
    rows: dict[str, dict[str, Any]] = {}
    try:
        with running_simulator(ttft_s=0.0, tokens_per_s=0.0, batch_turnaround_s=0.5) as sim:
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="ops",
                                upstream_base_url=sim, upstream_api_key="sk-bench",
                                log_level="WARNING", batch_mode="native", flush_interval_s=1.0,
                                poll_interval_s=0.5)
            client = redis.Redis.from_url(settings.redis_url)
            with Stack(settings) as stack:
                api = stack.start_api()
                stack.start_worker("stream")
                stack.start_worker("batch")
                stack.start_beat()
                keys = Keys(settings.key_prefix)
                warm = [submit(api, "high", "[[sim:tokens=5]] warm-up")]
                wait_until(lambda: terminal(client, keys, warm), 60, 0.2, message="warm-up")
                for lane, count in (("stream", streams), ("batch", low)):
                    before, started = snapshot(client), time.monotonic()
                    priority = "high" if lane == "stream" else "low"
                    directive = f"[[sim:tokens={tokens}]][[sim:tps={args.tps:g}]] " \
                        if lane == "stream" else ""
                    ids = [submit(api, priority, f"{directive}ops {lane} {i}")
                           for i in range(count)]
                    wait_until(lambda ids=ids: terminal(client, keys, ids), 600, 1.0,
                               message=f"{lane} requests terminal")
                    calls = delta(before, snapshot(client))
                    cpu_s = calls.pop("_cpu_s", 0.0)
                    total = sum(calls.values())
                    scripts = sum(calls.get(name, 0.0) for name in SCRIPT_RUNNERS)
                    per = tokens * count if lane == "stream" else count
                    rows[lane] = {
                        "requests": count, "tokens_per_request": tokens if lane == "stream"
                        else None, "seconds": round(time.monotonic() - started, 1),
                        "commands": int(total), "script_calls": int(scripts),
                        "commands_per_unit": round(total / per, 2),
                        "script_calls_per_unit": round(scripts / per, 2),
                        "commands_per_request": round(total / count, 1),
                        "redis_cpu_us_per_request": round(cpu_s * 1e6 / count),
                        "top": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:10]),
                    }
            client.close()
    finally:
        redis_proc.stop()
    print(f"\nRedis work per request ({streams} streams of {tokens} tokens at {args.tps:g}/s; "
          f"{low} low requests); unit = a token (stream) or a request (batch)\n")
    print(table(["lane", "requests", "commands", "script calls", "commands/unit",
                 "script calls/unit", "commands/request", "Redis CPU us/request"],
                [[lane, r["requests"], r["commands"], r["script_calls"], r["commands_per_unit"],
                  r["script_calls_per_unit"], r["commands_per_request"],
                  r["redis_cpu_us_per_request"]] for lane, r in rows.items()]))
    for lane, r in rows.items():
        print(f"{lane}: most run {r['top']}")
    path = write_result("redis_ops_quick" if args.quick else "redis_ops", {
        "quick": args.quick, "tps": args.tps, "lanes": rows})
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
