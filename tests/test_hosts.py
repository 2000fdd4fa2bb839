"""Many hosts (network namespaces), a Redis failover under Sentinel, a dead stream-worker host
and a cut API link: nothing lost, nothing doubled (tests/hosts.py).

The short form runs in the default suite where network namespaces can be built (root and
iproute2; skipped with the reason elsewhere); the long one (5,000 requests) with ``-m long``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hosts import HostsConfig, HostsReport, HostsRun
from tests.netns import unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None,
                                reason=f"cannot build network namespaces here: {REASON}")


def run_and_check(config: HostsConfig, workdir: Path) -> HostsReport:
    lines: list[str] = []
    report = HostsRun(config, workdir, log=lines.append).run_hosts()
    summary = "\n".join([*report.events, *report.lines()])
    print(summary)  # the figures, visible with -s and in the junit output
    detail = "\n".join(report.problems[:30]) + "\n" + "\n".join(lines)[-6000:]
    assert not report.problems, f"{summary}\n{detail}"
    chaos = report.chaos
    assert chaos.accepted == config.requests, summary
    assert sum(chaos.statuses.values()) == chaos.accepted, summary
    assert report.lost == 0 and report.doubled == 0, summary
    assert "sentinel promotes the replica" in report.recovery_s, summary
    assert "first 202 to a request sent after the primary died" in report.recovery_s, summary
    assert chaos.statuses["completed"] > chaos.accepted // 2, summary
    assert chaos.sse["followers"] > 0 and chaos.sse["bad"] == 0, summary
    return report


@pytest.mark.timeout(600)
def test_hosts_short(tmp_path: Path) -> None:
    run_and_check(HostsConfig(), tmp_path)


@pytest.mark.long
@pytest.mark.timeout(2400)
def test_hosts_long(tmp_path: Path) -> None:
    run_and_check(HostsConfig.long(), tmp_path)
