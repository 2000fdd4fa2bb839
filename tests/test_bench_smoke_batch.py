"""Smoke run of the batch-lane benchmark (flush + write-back + floors) at its tiny size.

It asserts only that the benchmark completes and prints its figures table; the figures
themselves come from full runs (`python -m bench.bench_batch_flush`), never asserted in tests.
"""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO_ROOT


def test_batch_flush_benchmark_quick_run_prints_figures() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_batch_flush", "--quick"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for text in ("Batch lane benchmark", "us/request", "peak RSS MB", "flush: claim",
                 "write-back: download", "floor: pipelined HSET", "floor: stream the output",
                 "written:"):
        assert text in proc.stdout, f"{text!r} missing from:\n{proc.stdout[-3000:]}"
