"""Smoke runs of the stream-lane and cost benchmarks at tiny sizes.

They assert only that each benchmark completes and prints its side-by-side figures; the figures
themselves are recorded in bench/RESULTS.md from full runs, never asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO_ROOT


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("bench.bench_ttft", ["TTFT benchmark", "direct", "drop-in", "written:"]),
        ("bench.bench_relay", ["Relay throughput", "capacity:", "written:"]),
        ("bench.bench_cost", ["Cost benchmark", "savings", "written:"]),
    ],
)
def test_benchmark_smoke_run_prints_figures(module: str, expected: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, f"{text!r} missing from:\n{proc.stdout[-3000:]}"
