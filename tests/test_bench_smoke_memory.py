"""Benchmark 6 (memory, issue 22) still runs: `python -m bench.bench_memory --quick` completes
through a whole deployment, prints its table and writes its JSON. Beyond running, it checks the
one figure the benchmark exists for: after the grace period, a finished request of either lane
leaves at most 1 KB beyond the raw JSON of its body and result (the keys are per request, so
this figure does not depend on the machine's load)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_memory_quick_reports_both_lanes_within_the_target() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_memory", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    header = next((line for line in run.stdout.splitlines() if line.lstrip().startswith("lane")),
                  None)
    assert header is not None and "overhead B" in header and "floor B" in header, report
    data = json.loads((ROOT / "bench" / "out" / "memory_quick.json").read_text())
    for lane in ("stream", "batch"):
        fig = data["lanes"][lane]
        assert fig["requests"] == 10 and fig["floor_bytes"] > 1000, fig
        assert fig["after_completion"]["bytes_per_request"] > fig["floor_bytes"], fig
        after = fig["after_grace"]
        assert after["overhead_bytes"] <= 1024, (lane, fig)
        assert "ev" not in after["by_kind"] and "seq" not in after["by_kind"], (lane, fig)
    assert "target:" in run.stdout and "-> met" in run.stdout, report
