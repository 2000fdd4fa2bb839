"""Benchmark 6 — memory: what a finished request leaves behind in Redis, per lane (issue 22).

Sends N streamed (priority high) and N batched (priority low) requests of a known prompt and
answer size through a whole deployment (a private redis-server, the API, a stream worker, a
batch worker, beat, the simulator) and reports, per lane, side by side with the floor:

- **floor**: the raw JSON of the request body plus the result the user reads back
  (``GET /v1/requests/{id}`` → ``body`` and ``result``), per request;
- **bytes per request** right after completion and again after the replay grace period
  (`Settings.replay_grace_s`; the benchmark sets it short), measured two ways: ``MEMORY USAGE``
  of every key that belongs to a request (its id is in the key's name), and the growth of
  ``INFO memory`` ``used_memory`` over the lane's requests;
- **overhead** = bytes per request (per key) - floor; the target of issue 22 is at most 1 KB.

    python -m bench.bench_memory            # 200 + 200 requests, 300-token answers
    python -m bench.bench_memory --quick    # smoke size -> bench/out/memory_quick.json
    python -m bench.bench_memory --drop-body   # with ROUTER_KEEP_BODY=false

Prompts and answers are English-like words (the simulator's answers; prompts drawn from a
seeded vocabulary), so compression gains are those of text, not of a repeated byte.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from bench.common import table, write_result
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, start_redis_server, wait_until

API_KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "gpt-4o-mini"
TARGET_OVERHEAD_B = 1024
VOCABULARY = " ".join((
    "the of and to in is that for it as was with be by on not he this are or his from at ",
    "which but have an they you were her she there been one all we their has would when if ",
    "so no will more can out up who what about into than them then some could time only new ",
    "these two may first any like now my such make over our even most after also made many ",
    "must before back through years where much your way well down should because each just ",
    "those people how too little state good very world still own see men work long get here ",
    "between both life being under never day same another know while last might us great old ",
    "year off come since against go came right used take three request stream batch router ",
    "model answer token prompt redis",
)).split()


def prompt_text(chars: int, seed: int) -> str:
    """About `chars` characters of words from a seeded vocabulary (different per request)."""
    rng = random.Random(seed)
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(VOCABULARY)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def request_keys(client: redis.Redis, ids: set[str]) -> dict[str, list[bytes]]:
    """Every key whose name holds a request id, by id (records, replay logs, counters...)."""
    by_id: dict[str, list[bytes]] = {i: [] for i in ids}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        start = name.find("{")
        if start >= 0:
            rid = name[start + 1:name.find("}", start)]
            if rid in by_id:
                by_id[rid].append(key)
    return by_id


def key_bytes(client: redis.Redis, keys: list[bytes]) -> tuple[int, dict[str, int]]:
    """MEMORY USAGE (every element sampled) of `keys`, in total and by kind of key."""
    total, kinds = 0, {}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    for key, used in zip(keys, pipe.execute(), strict=True):
        if used is None:  # expired between the scan and now
            continue
        kind = key.decode().split(":")[1]
        kinds[kind] = kinds.get(kind, 0) + int(used)
        total += int(used)
    return total, kinds


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def footprint(client: redis.Redis, ids: list[str]) -> dict[str, Any]:
    """Per-request bytes of the requests `ids` (MEMORY USAGE of their keys)."""
    by_id = request_keys(client, set(ids))
    totals, kinds_sum, key_counts = [], {}, []
    for rid in ids:
        total, kinds = key_bytes(client, by_id[rid])
        totals.append(total)
        key_counts.append(len(by_id[rid]))
        for kind, used in kinds.items():
            kinds_sum[kind] = kinds_sum.get(kind, 0) + used
    n = len(ids)
    return {
        "bytes_per_request": round(sum(totals) / n),
        "keys_per_request": round(sum(key_counts) / n, 2),
        "by_kind": {kind: round(used / n) for kind, used in sorted(kinds_sum.items())},
    }


def submit(http: httpx.Client, api_url: str, priority: str, prompt: str, tokens: int) -> str:
    body = {"model": MODEL, "priority": priority, "max_tokens": tokens,
            "messages": [{"role": "user", "content": prompt}]}
    resp = http.post(f"{api_url}/v1/requests", json=body, headers=HEADERS)
    resp.raise_for_status()
    return str(resp.json()["id"])


def wait_finished(http: httpx.Client, api_url: str, ids: list[str], timeout: float
                  ) -> dict[str, dict[str, Any]]:
    """Every request's record as the user reads it back, once each is completed."""
    done: dict[str, dict[str, Any]] = {}

    def all_done() -> bool:
        for rid in ids:
            if rid in done:
                continue
            view = http.get(f"{api_url}/v1/requests/{rid}", headers=HEADERS).json()
            if view["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"request {rid} ended {view['status']}: {view.get('error')}")
            if view["status"] != "completed":
                return False
            done[rid] = view
        return True

    wait_until(all_done, timeout, 0.2, message="every request completed")
    return done


def floor_bytes(views: dict[str, dict[str, Any]]) -> int:
    """Mean raw JSON of the request body plus the result the user reads back."""
    sizes = [len(orjson.dumps(v["body"])) + len(orjson.dumps(v["result"])) for v in views.values()]
    return round(sum(sizes) / len(sizes))


def run_lane(http: httpx.Client, client: redis.Redis, api_url: str, lane: str, n: int,
             prompt_chars: int, tokens: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    priority = "high" if lane == "stream" else "low"
    before = used_memory(client)
    ids = [submit(http, api_url, priority, prompt_text(prompt_chars, seed + i), tokens)
           for i in range(n)]
    views = wait_finished(http, api_url, ids, timeout=120 + n * 0.5)
    answer_chars = [len(v["result"]["content"]) for v in views.values()]
    fig: dict[str, Any] = {
        "requests": n,
        "prompt_chars": prompt_chars,
        "answer_tokens": tokens,
        "answer_chars_mean": round(sum(answer_chars) / n),
        "floor_bytes": floor_bytes(views),
        "after_completion": footprint(client, ids),
        "used_memory_growth_per_request": round((used_memory(client) - before) / n),
    }
    return ids, fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redis bytes per finished request, per lane")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--requests", type=int, default=200, help="requests per lane")
    parser.add_argument("--prompt-chars", type=int, default=1200)
    parser.add_argument("--tokens", type=int, default=300, help="answer tokens")
    parser.add_argument("--grace-s", type=float, default=3.0,
                        help="replay grace period set for the run (ROUTER_REPLAY_GRACE_S)")
    parser.add_argument("--drop-body", action="store_true",
                        help="run with ROUTER_KEEP_BODY=false (only the result kept once finished)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.tokens = 10, 50
    name = ("memory_quick" if args.quick else "memory") + ("_drop_body" if args.drop_body else "")

    workdir = Path(tempfile.mkdtemp(prefix="hr-bench-memory-"))
    redis_proc, redis_url = start_redis_server(workdir)
    lanes: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    try:
        with running_simulator(ttft_s=0.0, tokens_per_s=0.0, min_tokens=args.tokens,
                               max_tokens=args.tokens, batch_turnaround_s=0.2) as sim_url:
            extra: dict[str, Any] = {}
            if "replay_grace_s" in Settings.model_fields:
                extra["replay_grace_s"] = args.grace_s
            if args.drop_body:
                extra["keep_body"] = False
            settings = Settings(redis_url=f"{redis_url}/0", key_prefix="bench",
                                upstream_base_url=sim_url, upstream_api_key="sk-bench",
                                api_keys={API_KEY: "bench"}, log_level="WARNING",
                                flush_interval_s=0.5, poll_interval_s=0.3, **extra)
            config = {k: getattr(settings, k) for k in
                      ("result_ttl_s", "replay_ttl_s", "replay_grace_s", "keep_body",
                       "compress_min_bytes") if k in Settings.model_fields}
            with Stack(settings) as stack:
                api_url = stack.start_api()
                stack.start_worker("stream")
                stack.start_worker("batch")
                stack.start_beat()
                client = redis.Redis.from_url(settings.redis_url)
                with httpx.Client(timeout=30) as http:
                    ids: dict[str, list[str]] = {}
                    for i, lane in enumerate(("stream", "batch")):
                        ids[lane], lanes[lane] = run_lane(
                            http, client, api_url, lane, args.requests, args.prompt_chars,
                            args.tokens, seed=i * 100_000)
                    time.sleep(args.grace_s + 2.0)  # the grace period itself: nothing to poll
                    for lane in lanes:
                        lanes[lane]["after_grace"] = footprint(client, ids[lane])
                client.close()
    finally:
        redis_proc.stop()

    rows = []
    for lane, fig in lanes.items():
        for when in ("after_completion", "after_grace"):
            used = fig[when]["bytes_per_request"]
            rows.append([lane, when.replace("_", " "), fig["floor_bytes"], used,
                         used - fig["floor_bytes"], fig[when]["keys_per_request"],
                         " ".join(f"{k}={v}" for k, v in fig[when]["by_kind"].items())])
            fig[when]["overhead_bytes"] = used - fig["floor_bytes"]
    print(f"\nMemory benchmark — {args.requests} requests per lane, prompt {args.prompt_chars} "
          f"chars, answer {args.tokens} tokens, settings {config}; bytes per request (MEMORY USAGE of its keys); "
          f"floor = raw JSON of body + result\n")
    print(table(["lane", "when", "floor B", "redis B", "overhead B", "keys", "by kind (B)"],
                rows))
    for lane, fig in lanes.items():
        print(f"{lane}: used_memory growth per request right after completion "
              f"{fig['used_memory_growth_per_request']:,} B")
    worst = max(f["after_grace"]["overhead_bytes"] for f in lanes.values())
    print(f"target: overhead <= {TARGET_OVERHEAD_B} B per finished request (after the grace "
          f"period); worst {worst:,} B -> {'met' if worst <= TARGET_OVERHEAD_B else 'NOT met'}")
    path = write_result(name, {"settings": config, "grace_s": args.grace_s, "lanes": lanes,
                               "target_overhead_bytes": TARGET_OVERHEAD_B})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
