"""Nothing lost, nothing doubled, under upstream faults, SIGKILLs and a Redis crash (tests/chaos.py).

The short form runs in CI (300 low + 40 high, kills of every process kind, one Redis crash);
the long form (``pytest -m long`` or ``python -m tests.chaos --long``) runs thousands.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import ChaosConfig, ChaosReport, ChaosRun


def run_and_check(config: ChaosConfig) -> ChaosReport:
    lines: list[str] = []
    report = ChaosRun(config, log=lines.append).run()
    summary = "\n".join(report.lines())
    print(summary)  # the counts, visible with -s and in the junit output
    detail = "\n".join(report.problems[:30]) + "\n" + "\n".join(lines)[-6000:]
    assert not report.problems, f"{summary}\n{detail}"
    assert report.accepted == config.low + config.high, summary
    assert sum(report.statuses.values()) == report.accepted, summary
    assert set(report.kills) == {"api", "worker-stream", "worker-batch", "beat"}, summary
    assert sum(report.kills.values()) == config.process_kills, summary
    assert report.redis_restarts == config.redis_restarts, summary
    assert report.statuses["completed"] > report.accepted // 2, summary
    injected = report.upstream.get("errors_injected", 0) + report.upstream.get("streams_dropped", 0)
    assert injected > 0, f"no upstream fault was injected: {summary}"
    return report


@pytest.mark.slow  # a minute of chaos: run by .ci/run after the default run (-m slow)
def test_chaos_short(tmp_path: Path) -> None:
    run_and_check(ChaosConfig(low=300, high=40, seed=11, workdir=tmp_path))


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_chaos_long(tmp_path: Path) -> None:
    config = ChaosConfig.long(seed=12)
    config.workdir = tmp_path
    run_and_check(config)
