"""Can a tenant tell another tenant's request id from an unknown one by timing `GET /v1/requests/{id}`?

One API process (uvicorn, as in production) over a private Redis. Tenant B owns a request with a
large record (an ~800 KB prompt); tenant A then asks for it, for an unknown well-formed id and
for a malformed id, `--tries` times each, interleaved (foreign, unknown, malformed, foreign, ...)
on one keep-alive connection so that drift in the machine's load hits the three alike. Every
answer must be the same 404. Figures: docs/RELIABILITY.md ("Tenants").

    python -m bench.bench_probe [--tries 1000] [--record-kb 800]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from bench.common import summary_ms, table, write_result
from hybrid_router.settings import Settings
from tests.support import Stack, start_redis_server

KEY_A, KEY_B = "sk-probe-a", "sk-probe-b"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tries", type=int, default=1000)
    parser.add_argument("--record-kb", type=int, default=800)
    args = parser.parse_args(argv)
    redis_proc, redis_url = start_redis_server(Path(tempfile.mkdtemp(prefix="hr-probe-")))
    settings = Settings(redis_url=f"{redis_url}/0", key_prefix="probe",
                        upstream_base_url="http://127.0.0.1:9/v1", upstream_api_key="sk-unused",
                        api_keys={KEY_A: "a", KEY_B: "b"}, log_level="WARNING")
    stack = Stack(settings)
    try:
        url = stack.start_api()
        with httpx.Client(base_url=url, timeout=30) as client:
            created = client.post("/v1/requests", headers={"Authorization": f"Bearer {KEY_B}"},
                                  json={"priority": "low", "messages": [
                                      {"role": "user", "content": "x" * (args.record_kb * 1000)}]})
            created.raise_for_status()
            cases = {"foreign": created.json()["id"], "unknown": uuid.uuid4().hex,
                     "malformed": "not-an-id-" + "z" * 22}
            durations: dict[str, list[float]] = {name: [] for name in cases}
            headers = {"Authorization": f"Bearer {KEY_A}"}
            for request_id in cases.values():  # warm up (scripts loaded, caches filled)
                for _ in range(20):
                    client.get(f"/v1/requests/{request_id}", headers=headers)
            for _ in range(args.tries):
                for name, request_id in cases.items():
                    started = time.perf_counter()
                    response = client.get(f"/v1/requests/{request_id}", headers=headers)
                    durations[name].append(time.perf_counter() - started)
                    assert response.status_code == 404, (name, response.status_code)
        summaries = {name: summary_ms(values) for name, values in durations.items()}
        print(f"GET /v1/requests/{{id}} as another tenant, {args.tries} tries each, "
              f"foreign record ~{args.record_kb} KB")
        print(table(["case", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
                    [[name, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"]]
                     for name, s in summaries.items()]))
        write_result("probe", {"tries": args.tries, "record_kb": args.record_kb,
                               "cases": summaries})
    finally:
        stack.stop()
        redis_proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
