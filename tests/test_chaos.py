"""Nothing lost, nothing doubled, under upstream faults, SIGKILLs and Redis crashes (tests/chaos.py).

The short form runs in CI (300 low + 40 high, every high one followed over SSE, kills of every
process kind, two Redis crashes of which one keeps Redis down 5-10 s); the long form
(``pytest -m long`` or ``python -m tests.chaos --long``) runs thousands. ``CHAOS_SEED`` picks
another seed for the short form.
"""

from __future__ import annotations

import os
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
    assert max(report.redis_outages_s) >= config.long_outage_s[0], summary
    assert not report.unexpected_exits, summary  # every process survived all but its SIGKILLs
    assert report.sse["followers"] == min(config.sse_followers, config.high), summary
    assert report.statuses["completed"] > report.accepted // 2, summary
    injected = report.upstream.get("errors_injected", 0) + report.upstream.get("streams_dropped", 0)
    assert injected > 0, f"no upstream fault was injected: {summary}"
    return report


@pytest.mark.timeout(600)  # about a minute; a broken router makes it wait out its deadlines
@pytest.mark.slow  # a minute of chaos: run by .ci/run after the default run (-m slow)
def test_chaos_short(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "11"))
    run_and_check(ChaosConfig(low=300, high=40, seed=seed, workdir=tmp_path))


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_chaos_long(tmp_path: Path) -> None:
    config = ChaosConfig.long(seed=12)
    config.workdir = tmp_path
    run_and_check(config)
