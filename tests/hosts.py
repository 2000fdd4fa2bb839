"""Many hosts, a Redis failover, and still nothing lost (issue 21).

Every part runs on a host of its own: a network namespace with a private address on a bridge
(`tests.netns`), so a host can die or lose its link while the others go on.

    redis-a (primary)   redis-b (replica)   sentinel-1..3
    api-1   api-2       stream-1   stream-2   batch   beat
    this process: the clients (two APIs behind a "load balancer" that tries the other one) and
    the upstream simulator, on the bridge's address

The run (short form in the default suite through tests/test_hosts.py, long form with
``pytest -m long`` or ``python -m tests.hosts --long``):

1. Mixed requests (`tests.chaos.plan_requests`: low and high, some with upstream fault
   directives) are submitted over a window, each with an idempotency key, alternating between
   the two APIs and retried on the other one when an answer does not come.
2. During the window: the host ``stream-1`` dies (every process SIGKILLed, link down, for
   good), the Redis primary dies (redis-server SIGKILLed: Sentinel promotes the replica), and
   ``api-2``'s link is cut for a few seconds and restored.
3. Then every accepted request must be terminal within a deadline, and checked as the chaos run
   checks (`tests.chaos.ChaosRun._verify`): exactly one final event of the kind its status
   says, its own answer (fault-free oracle), SSE followers saw every event once and in order,
   no prompt answered in full twice upstream, no batch line succeeded twice, the ledger equals
   the records; plus here: every replay log's seqs are 1..n (no gap, no duplicate) and no
   process on a live host exited.

The figures (accepted, completed, failed by reason, lost, doubled, times to recover) are
printed; docs/RELIABILITY.md ("Many hosts") keeps the latest.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.chaos import (
    SSE_KEEPALIVE_S,
    ChaosConfig,
    ChaosReport,
    ChaosRun,
    Planned,
    plan_requests,
)
from tests.netns import Network
from tests.sentinel_support import SentinelGroup
from tests.support import ManagedProcess, child_env, cli_argv, wait_until

API_PORT = 8000
REDIS_PORT = 6379
SENTINEL_PORT = 26379
SUBMIT_PATIENCE_S = 90.0


@dataclass
class HostsConfig:
    requests: int = 120
    high_share: float = 0.3
    seed: int = 21
    submit_window_s: float = 20.0
    stream_concurrency: int = 64
    api_cut_s: float = 4.0
    sse_followers: int = 20
    deadline_s: float = 120.0
    submit_threads: int = 16

    @classmethod
    def long(cls, seed: int = 21) -> HostsConfig:
        return cls(requests=5000, submit_window_s=240, sse_followers=100, deadline_s=600,
                   submit_threads=32, seed=seed)


@dataclass
class HostsReport:
    """The chaos run's counts (`chaos`) and what this run adds."""

    chaos: ChaosReport = field(default_factory=ChaosReport)
    submit_retries: int = 0
    rerouted: int = 0  # submissions answered by the other API after one did not answer
    lost: int = 0
    doubled: int = 0
    events: list[str] = field(default_factory=list)  # what happened when
    recovery_s: dict[str, float] = field(default_factory=dict)
    unexpected_exits: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        chaos = self.chaos
        return [
            f"accepted {chaos.accepted} (submit retries {self.submit_retries}, answered by the "
            f"other API {self.rerouted}); by route {dict(chaos.by_route)}",
            f"terminal statuses {dict(chaos.statuses)}",
            f"failed by reason {dict(chaos.failed_by_reason)}",
            f"lost {self.lost}; doubled {self.doubled}",
            "recovery " + ", ".join(f"{k} {v:.1f}s" for k, v in self.recovery_s.items()),
            f"sse followers {dict(chaos.sse)}",
            f"upstream {chaos.upstream}",
            f"unexpected exits {self.unexpected_exits}",
            f"problems {len(self.problems)}; {self.seconds:.1f}s",
        ]


class HostsRun(ChaosRun):
    """The chaos run's plan, followers and verification, on many hosts."""

    def __init__(self, config: HostsConfig, workdir: Path | None = None, log: Any = print
                 ) -> None:
        high = round(config.requests * config.high_share)
        chaos = ChaosConfig(low=config.requests - high, high=high, seed=config.seed,
                            sse_followers=config.sse_followers, cancels=0,
                            submit_window_s=config.submit_window_s,
                            submit_threads=config.submit_threads)
        super().__init__(chaos, log)
        self.hosts_config = config
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="hr-hosts-"))
        self.hosts_report = HostsReport()
        self.apis: list[str] = []
        self.down: set[str] = set()  # API URLs known cut (the load balancer's health check)
        self.processes: dict[str, ManagedProcess] = {}
        self.dead_hosts: set[str] = set()
        self.net = Network()
        self.submit_patience_s = SUBMIT_PATIENCE_S
        self.t0 = 0.0

    # -- the hosts --
    def _start(self, host: str, argv: list[str], settings: Settings) -> ManagedProcess:
        proc = ManagedProcess(host, [*self.net.prefix(host), *argv], child_env(settings),
                              self.workdir / f"{host}.log").start()
        self.processes[host] = proc
        return proc

    def _start_router(self, settings: Settings) -> None:
        for name in ("api-1", "api-2"):
            self._start(name, cli_argv("api", "--host", self.net.hosts[name],
                                       "--port", str(API_PORT)), settings)
        for name in ("stream-1", "stream-2"):
            self._start(name, cli_argv("worker", "--lane", "stream", "--name", f"{name}@%h",
                                       "--concurrency", str(self.hosts_config.stream_concurrency)),
                        settings)
        self._start("batch", cli_argv("worker", "--lane", "batch", "--name", "batch@%h"),
                    settings)
        self._start("beat", cli_argv("beat", "--schedule", str(self.workdir / "beat-schedule")),
                    settings)
        self.apis = [f"http://{self.net.hosts[n]}:{API_PORT}" for n in ("api-1", "api-2")]

        def ready() -> bool:
            for name, proc in self.processes.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} exited:\n{proc.output()[-3000:]}")
            for api in self.apis:
                if httpx.get(f"{api}/readyz", timeout=1).status_code != 200:
                    return False
            return all("ready" in self.processes[n].output()
                       for n in ("stream-1", "stream-2", "batch"))

        wait_until(ready, 90, 0.2, message="the router's hosts ready")

    # -- clients --
    def _live_api(self, index: int) -> str:
        live = [a for a in self.apis if a not in self.down] or self.apis
        return live[index % len(live)]

    def _follow_url(self, request_id: str) -> Callable[[], str]:
        pick = random.Random(request_id).randrange(2)
        return lambda: self._live_api(pick)

    def _submit_url(self, planned: Planned, attempt: int) -> str:
        """Round robin over the two APIs; after a failure, the other one (a load balancer)."""
        return self.apis[(planned.index + attempt) % len(self.apis)]

    # -- faults --
    def _note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        self.hosts_report.events.append(line)
        self.log(line)

    def _first_accept_after(self, moment: float, timeout: float) -> float | None:
        def seen() -> float | None:
            with self.lock:  # requests first sent after `moment`: not in flight when it came
                later = [t for i, t in self.accepted_at.items() if self.first_try_at[i] > moment]
            return min(later) if later else None

        try:
            return wait_until(seen, timeout, 0.05, message="an acceptance") - moment
        except TimeoutError:
            return None

    def _faults(self, group: SentinelGroup) -> None:
        window = self.hosts_config.submit_window_s
        report = self.hosts_report
        time.sleep(window * 0.2)
        self._note("host stream-1 dies (all its processes SIGKILLed, link down)")
        self.net.kill("stream-1")
        self.dead_hosts.add("stream-1")

        time.sleep(window * 0.2)
        self._note("the Redis primary (redis-a) dies: SIGKILL")
        killed = time.monotonic()
        assert group.primary.proc is not None
        self.dead_hosts.add("redis-a")
        group.primary.proc.kill()
        promoted = (group.replica.host, group.replica.port)
        try:
            wait_until(lambda: group.current_master() == promoted, 60, 0.05,
                       message="Sentinel promoting the replica")
            report.recovery_s["sentinel promotes the replica"] = time.monotonic() - killed
            self._note("Sentinel named redis-b the master")
        except TimeoutError as exc:
            report.problems.append(str(exc))
        after = self._first_accept_after(killed, 60)
        if after is not None:
            report.recovery_s["first 202 to a request sent after the primary died"] = after

        time.sleep(window * 0.1)
        self._note(f"api-2's link cut for {self.hosts_config.api_cut_s:g}s")
        self.net.cut("api-2")
        self.down.add(self.apis[1])
        cut_at = time.monotonic()
        try:  # the cut is real: api-2 does not answer (a refused connection would be a bug too)
            httpx.get(f"{self.apis[1]}/healthz", timeout=1.0)
            report.problems.append("api-2 answered while its link was cut")
        except httpx.HTTPError:
            pass
        time.sleep(max(0.0, self.hosts_config.api_cut_s - (time.monotonic() - cut_at)))
        self.net.restore("api-2")
        self.down.discard(self.apis[1])
        self._note("api-2's link restored")

    # -- the run --
    def run_hosts(self) -> HostsReport:
        started = time.monotonic()
        report = self.hosts_report
        with ExitStack() as exits:
            self.net.open()
            exits.callback(self.net.close)
            exits.callback(self.followers_stop.set)
            exits.callback(self.submissions_stop.set)  # no client left retrying after the run
            for name in ("redis-a", "redis-b", "sentinel-1", "sentinel-2", "sentinel-3",
                         "api-1", "api-2", "stream-1", "stream-2", "batch", "beat"):
                self.net.add(name)
            hosts = self.net.hosts
            group = SentinelGroup(
                self.workdir, ((hosts["redis-a"], REDIS_PORT), (hosts["redis-b"], REDIS_PORT)),
                [(hosts[f"sentinel-{i}"], SENTINEL_PORT) for i in (1, 2, 3)],
                prefix=self.net.prefix)
            exits.callback(group.stop)
            group.start()
            sim = exits.enter_context(running_simulator(
                host=self.net.gateway, seed=self.config.seed, batch_turnaround_s=1.0))
            settings = Settings(
                redis_url=group.url, key_prefix=f"hosts{self.run_id}",
                upstream_base_url=sim, upstream_api_key="sk-sim", upstream_timeout_s=10,
                batch_mode="native", flush_interval_s=2.0, poll_interval_s=1.0,
                batch_max_attempts=6, batch_lock_ttl_s=5.0, expected_batch_turnaround_s=5.0,
                stream_max_retries=6, retry_backoff_base_s=0.05, retry_backoff_max_s=0.5,
                stream_idle_timeout_s=10, stream_lease_s=3.0, stream_redispatch_after_s=6.0,
                replay_grace_s=3600, sse_keepalive_s=SSE_KEEPALIVE_S, log_format="json",
                log_level="INFO",
            )
            self.settings_batch_max_attempts = settings.batch_max_attempts
            exits.callback(self._stop_processes)
            self._start_router(settings)
            self.log(f"hosts up: {hosts}")
            plan = plan_requests(self.config, self.run_id, self.rng)
            high = [p.index for p in plan if p.priority == "high"]
            self.follow_indices = set(random.Random(self.config.seed + 3).sample(
                high, min(self.config.sse_followers, len(high))))
            self.t0 = time.monotonic()
            submitter = threading.Thread(target=self._submitter, args=(plan,), daemon=True)
            faults = threading.Thread(target=self._faults, args=(group,), daemon=True)
            submitter.start()
            faults.start()
            faults.join(self.hosts_config.submit_window_s + 180)
            submitter.join(2 * self.hosts_config.submit_window_s + SUBMIT_PATIENCE_S + 120)
            if submitter.is_alive():
                report.problems.append("submissions still under way long after the window")
                self.submissions_stop.set()
                submitter.join(30)
            self.submissions_stop.set()  # (all done by now; a late answer is not recorded)
            client = sync_client(settings.redis_url, socket_timeout=10)
            exits.callback(client.close)
            self._wait_terminal(client, settings, time.monotonic()
                                + self.hosts_config.deadline_s, lambda: None)
            self._wait_followers(time.monotonic() + 30)
            self._check_processes()
            self._verify(client, settings, sim, plan)
            self._check_seqs(client, settings)
            self._collect()
            report.seconds = time.monotonic() - started
            if report.problems:
                self.log(self._logs()[-8000:])
        return report

    def _stop_processes(self) -> None:
        for proc in self.processes.values():
            proc.stop(timeout=5)

    def _logs(self) -> str:
        return "\n".join(f"===== {n} =====\n{p.output()[-3000:]}"
                         for n, p in self.processes.items())

    def _check_processes(self) -> None:
        """Every process on a live host is still running (none gave up on the failover)."""
        for name, proc in self.processes.items():
            if name not in self.dead_hosts and not proc.alive():
                self.hosts_report.unexpected_exits.append(name)
                self.hosts_report.problems.append(
                    f"{name} exited on its own:\n{proc.output()[-1500:]}")

    def _check_seqs(self, client: redis.Redis, settings: Settings) -> None:
        """Every request's replay log numbers its events 1..n: no gap, no duplicate."""
        keys = Keys(settings.key_prefix)
        for rid in self.accepted.values():
            entries: list[Any] = client.xrange(keys.events(rid)) or []
            seqs = [int(orjson.loads(fields[b"d"])["seq"]) for _entry, fields in entries]
            if seqs != list(range(1, len(seqs) + 1)):
                self.hosts_report.problems.append(f"{rid}: replay log seqs {seqs[:40]}")

    def _collect(self) -> None:
        """The chaos report's counts and problems into this run's report."""
        chaos, report = self.report, self.hosts_report
        report.chaos = chaos
        report.submit_retries = chaos.submit_retries
        report.rerouted = sum(1 for tries in self.retried_before_accepted.values() if tries)
        report.lost = sum("accepted and then lost" in p for p in chaos.problems)
        report.doubled = sum(("answered in full upstream" in p or "succeeded in" in p)
                             for p in chaos.problems)
        report.problems.extend(chaos.problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="5,000 requests")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--seed", type=int, default=21)
    args = parser.parse_args(argv)
    from tests.netns import unavailable

    reason = unavailable()
    if reason:
        print(f"cannot build hosts here: {reason}")
        return 2
    config = HostsConfig.long(args.seed) if args.long else HostsConfig(seed=args.seed)
    if args.requests is not None:
        config.requests = args.requests
    report = HostsRun(config).run_hosts()
    for line in [*report.events, *report.lines()]:
        print(line)
    for problem in report.problems[:50]:
        print("PROBLEM", problem)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
