"""The scale-out modes still run: `bench_intake --api-processes 1,2 --quick` and `bench_relay
--stream-workers 1,2 --quick` complete and print one row per process count, with the CPU per
request / per stream columns. Only that they work end to end; the figures are not judged here
(bench/RESULTS.md, docs/OPERATIONS.md "Sizing")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("args", "columns"), [
    (["bench.bench_intake", "--api-processes", "1,2"], ["API processes", "API CPU us/req",
                                                        "Redis CPU us/req"]),
    (["bench.bench_relay", "--stream-workers", "1,2"], ["workers", "workers ms/s/stream",
                                                        "redis ms/s/stream"]),
])
def test_scale_out_prints_one_row_per_count(args: list[str], columns: list[str]) -> None:
    run = subprocess.run([sys.executable, "-m", *args, "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    report = run.stdout[-4000:] + run.stderr[-4000:]
    assert run.returncode == 0, report
    lines = run.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith(columns[0])), None)
    assert header is not None, report
    assert all(column in lines[header] for column in columns), lines[header]
    rows = [line.split() for line in lines[header + 2:header + 4]]
    assert [row[0] for row in rows] == ["1", "2"], report
    width = len(rows[0])
    assert all(len(row) == width for row in rows), report
