"""Smoke runs of the stream-lane, cost and CPU benchmarks at tiny sizes.

They assert only that each benchmark completes and prints its side-by-side figures; the figures
themselves are recorded in bench/RESULTS.md from full runs, never asserted in tests.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT

# A figures row: the level, (the way,) then numbers.
TTFT_ROW = r"^\s*5\s+{way}\s+\d+\s+[\d.,]+\s+[\d.,]+"
RELAY_ROW = r"^\s*10\s+[\d.,]+\s+[\d.,]+\s+[\d.,]+\s+[\d.,]+"


@pytest.mark.parametrize(
    ("module", "expected", "rows"),
    [
        ("bench.bench_ttft", ["TTFT benchmark", "Sustained: N streams kept in flight",
                              "Burst: N started at the same instant", "client cpu",
                              "target at 50 sustained streams", "written:"],
         # each way's row in the sustained, load and burst tables
         [TTFT_ROW.format(way=way) for way in ("direct", "events", "drop-in")]),
        ("bench.bench_relay", ["Relay throughput", "B sustained: N streams kept in flight",
                               "B burst: N started at the same instant", "client cpu",
                               "capacity (sustained):", "written:"],
         [RELAY_ROW]),
        ("bench.bench_cost", ["Cost benchmark", "savings", "Cost benchmark, tiers",
                              "all at the priority tier", "exact=True", "written:"], []),
        ("bench.bench_cpu", ["CPU benchmark", "Redis calls per stream (events)", "idle:",
                             "Redis calls", "written:"], []),
    ],
)
def test_benchmark_smoke_run_prints_figures(module: str, expected: list[str], rows: list[str]
                                            ) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in expected:
        assert text in proc.stdout, f"{text!r} missing from:\n{proc.stdout[-3000:]}"
    for row in rows:  # sustained and burst tables each print their figures rows
        assert len(re.findall(row, proc.stdout, re.MULTILINE)) >= 2, \
            f"{row!r} not in two tables:\n{proc.stdout[-3000:]}"
