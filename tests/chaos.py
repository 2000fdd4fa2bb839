"""Nothing lost, nothing doubled: a mixed run under upstream faults, crashes and a Redis restart.

The run (short form in CI through tests/test_chaos.py, long form from the command line):

    python -m tests.chaos --long            # thousands of low, hundreds of high requests
    python -m tests.chaos --low 300 --high 40 --seed 7

1. A private redis-server with ``--appendonly yes --appendfsync always``, a chaos simulator
   injecting 429s, 5xx, mid-stream drops, failed, expired and partly errored batches (rates,
   seeded, plus per-prompt directives), and the router's real processes: API, stream worker,
   batch worker, beat.
2. Requests are submitted over HTTP with an idempotency key each, retried until accepted
   (a submit during a Redis restart fails and is retried: the key makes that safe). A few are
   cancelled on the way.
3. Meanwhile, at seeded random moments, the API, the stream worker, the batch worker and beat are
   SIGKILLed and restarted, and Redis itself is SIGKILLed and restarted on the same port and dir.
4. Then, within a deadline, every accepted request must be terminal, and:
   - its replay log holds exactly one final event, of the kind its status says;
   - completed ones carry exactly their own answer (a fault-free oracle simulator with the same
     seed gives the deterministic answer for each prompt, through the openai SDK);
   - nothing succeeded upstream twice: per prompt, completed streams + completions <= 1 (stream
     lane, `/sim/stats`), and per request id at most one successful line over every batch output
     file (batch lane, read back through the Files API);
   - the cost ledger equals the sum of the recorded costs, per route.
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import redis

from router.events import FINAL_EVENT_TYPES
from router.keys import Keys
from router.ledger import Ledger
from router.records import RequestRecord
from settings import Settings
from simulator import prompt_hash
from simulator.testing import running_simulator, sim_stats
from tests.support import ManagedProcess, Stack, delete_prefix, free_port, start_redis_server

TERMINAL = frozenset({"completed", "failed", "cancelled"})
FINAL_FOR_STATUS = {"completed": "done", "failed": "error", "cancelled": "cancelled"}
MODEL = "gpt-4o-mini"


@dataclass
class ChaosConfig:
    low: int = 300
    high: int = 40
    seed: int = 1
    submit_window_s: float = 25.0  # submissions are spread over this long
    chaos_window_s: float = 35.0  # kills and restarts happen in this window
    process_kills: int = 8  # SIGKILLs of API / stream worker / batch worker / beat, in total
    redis_restarts: int = 1
    cancels: int = 8
    deadline_s: float = 120.0  # after the chaos window, for everything to become terminal
    workdir: Path | None = None

    @classmethod
    def long(cls, seed: int = 1) -> ChaosConfig:
        return cls(low=3000, high=300, seed=seed, submit_window_s=150, chaos_window_s=180,
                   process_kills=40, redis_restarts=3, cancels=60, deadline_s=400)


@dataclass
class ChaosReport:
    accepted: int = 0
    submit_retries: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    cancels_asked: int = 0
    kills: Counter[str] = field(default_factory=Counter)
    redis_restarts: int = 0
    unexpected_exits: Counter[str] = field(default_factory=Counter)
    upstream: dict[str, int] = field(default_factory=dict)
    batches: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)  # batch requests out of attempts

    def lines(self) -> list[str]:
        return [
            f"accepted {self.accepted} (submit retries {self.submit_retries}); "
            f"by route {dict(self.by_route)}",
            f"terminal statuses {dict(self.statuses)}",
            f"failed by reason {dict(self.failed_by_reason)}",
            f"cancels asked {self.cancels_asked}",
            f"kills {dict(self.kills)}; redis restarts {self.redis_restarts}; "
            f"unexpected exits {dict(self.unexpected_exits)}",
            f"upstream {self.upstream}",
            f"batches by final status {dict(self.batches)}; "
            f"batch requests out of attempts {len(self.gave_up)}",
            f"problems {len(self.problems)}; {self.seconds:.1f}s",
        ]


# --- the plan ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    index: int
    priority: str
    content: str
    idempotency_key: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.content}]


def plan_requests(config: ChaosConfig, run_id: str, rng: random.Random) -> list[Planned]:
    """Interleaved low and high requests, some with per-prompt fault directives."""
    kinds = ["low"] * config.low + ["high"] * config.high
    rng.shuffle(kinds)
    out = []
    for i, priority in enumerate(kinds):
        directive = ""
        roll = rng.random()
        if priority == "high":
            if roll < 0.15:
                directive = " [[sim:drop_after=3]]"
            elif roll < 0.25:
                directive = " [[sim:fail=500,times=1]]"
            elif roll < 0.35:
                directive = " [[sim:fail=429,times=2,retry_after=0.1]]"
            elif roll < 0.55:
                directive = " [[sim:tokens=40,tps=20]]"  # long enough to be killed mid-stream
        elif roll < 0.01:
            directive = " [[sim:line_error=1]]"
        content = f"chaos {run_id} #{i} {priority}{directive}"
        out.append(Planned(i, priority, content, f"chaos-{run_id}-{i}"))
    return out


# --- the private Redis that can be restarted -----------------------------------------------------

class RestartableRedis:
    """redis-server with an append-only file, killed and started again on the same port/dir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: ManagedProcess | None = None
        self.url = ""

    def start(self) -> str:
        self.proc, self.url = start_redis_server(
            self.workdir, appendonly=True, port=self.port,
            extra_args=("--appendfsync", "always"))
        return self.url

    def crash_and_restart(self, down_s: float) -> None:
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)
        assert self.proc.proc is not None
        self.proc.proc.wait(10)
        time.sleep(down_s)  # the outage itself: everybody must cope with Redis being away
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# --- the run -------------------------------------------------------------------------------------

class ChaosRun:
    def __init__(self, config: ChaosConfig, log: Any = print) -> None:
        self.config = config
        self.log = log
        self.rng = random.Random(config.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.report = ChaosReport()
        self.accepted: dict[int, str] = {}  # plan index -> request id
        self.lock = threading.Lock()  # one chaos action at a time vs. process bookkeeping
        self.stop_event = threading.Event()
        self.cancel_targets: dict[int, float] = {}  # plan index -> seconds after acceptance
        self.cancels_acknowledged: set[str] = set()
        self.settings_batch_max_attempts = 0
        self.api_url = ""

    # -- submitting --
    def _submit_one(self, planned: Planned, deadline: float) -> None:
        body = {"priority": planned.priority, "messages": planned.messages, "model": MODEL,
                "idempotency_key": planned.idempotency_key}
        while time.monotonic() < deadline:
            try:
                response = httpx.post(f"{self.api_url}/v1/requests", json=body, timeout=10)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code in (200, 202):
                request_id = response.json()["id"]
                with self.lock:
                    self.accepted[planned.index] = request_id
                if planned.index in self.cancel_targets:
                    self._cancel(request_id, self.cancel_targets[planned.index])
                return
            with self.lock:
                self.report.submit_retries += 1
            time.sleep(0.2)
        self.report.problems.append(f"request #{planned.index} never accepted")

    def _submitter(self, plan: list[Planned]) -> None:
        start = time.monotonic()
        gap = self.config.submit_window_s / max(1, len(plan))
        deadline = start + self.config.submit_window_s + 60
        with ThreadPoolExecutor(8) as pool:
            for i, planned in enumerate(plan):
                delay = start + i * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._submit_one, planned, deadline)

    def _cancel(self, request_id: str, after_s: float) -> None:
        """Cancel soon after acceptance, while the request is queued or streaming."""
        time.sleep(after_s)
        try:
            response = httpx.delete(f"{self.api_url}/v1/requests/{request_id}", timeout=10)
        except httpx.HTTPError:
            return
        with self.lock:
            self.report.cancels_asked += 1
            if response.status_code == 200:
                self.cancels_acknowledged.add(request_id)

    # -- chaos --
    def _chaos(self, stack: Stack, procs: dict[str, ManagedProcess], store: RestartableRedis,
               rng: random.Random) -> None:
        actions = ["kill"] * self.config.process_kills + ["redis"] * self.config.redis_restarts
        times = sorted(rng.uniform(2, self.config.chaos_window_s) for _ in actions)
        rng.shuffle(actions)
        order = sorted(procs)
        rng.shuffle(order)
        targets = itertools.cycle(order)  # every kind of process gets killed
        start = time.monotonic()
        for at, action in zip(times, actions, strict=True):
            while time.monotonic() - start < at:
                if self.stop_event.wait(0.05):
                    return
            if action == "redis":
                self.log(f"[chaos {time.monotonic() - start:5.1f}s] SIGKILL redis, restart")
                store.crash_and_restart(down_s=rng.uniform(0.5, 2.0))
                self.report.redis_restarts += 1
            else:
                name = next(targets)
                self.log(f"[chaos {time.monotonic() - start:5.1f}s] SIGKILL {name}, restart")
                procs[name].kill(signal.SIGKILL)
                self.report.kills[name] += 1
                time.sleep(rng.uniform(0.2, 1.5))
                procs[name] = self._start(stack, name)
            self._heal(stack, procs)

    def _start(self, stack: Stack, name: str) -> ManagedProcess:
        if name == "api":  # a new port: clients follow `api_url`, like a load balancer would
            self.api_url = stack.start_api(timeout=60)
            return stack.processes[-1]
        if name == "beat":
            return stack.start_beat(timeout=60)
        return stack.start_worker(name.removeprefix("worker-"),
                                  concurrency=16 if name == "worker-stream" else None,
                                  timeout=60)

    def _heal(self, stack: Stack, procs: dict[str, ManagedProcess]) -> None:
        """Restart anything that died on its own (a finding: it should have survived)."""
        for name, proc in list(procs.items()):
            if not proc.alive():
                self.report.unexpected_exits[name] += 1
                self.log(f"[chaos] {name} exited on its own:\n{proc.output()[-1500:]}")
                procs[name] = self._start(stack, name)

    # -- the whole run --
    def run(self) -> ChaosReport:
        started = time.monotonic()
        config = self.config
        with ExitStack() as exits:
            workdir = config.workdir or Path(tempfile.mkdtemp(prefix="hr-chaos-"))
            store = RestartableRedis(workdir)
            store.start()
            exits.callback(store.stop)
            sim = exits.enter_context(running_simulator(
                seed=config.seed, rate_429=0.04, rate_500=0.03, rate_503=0.02, rate_drop=0.05,
                retry_after_s=0.1, batch_turnaround_s=1.0, batch_fail_rate=0.1,
                batch_expire_rate=0.1, line_error_rate=0.02))
            settings = Settings(
                redis_url=f"{store.url}/0", key_prefix=f"chaos{self.run_id}",
                upstream_base_url=sim, upstream_api_key="sk-sim", upstream_timeout_s=10,
                batch_mode="native", flush_interval_s=2.0, poll_interval_s=1.0,
                batch_max_attempts=6, batch_lock_ttl_s=5.0, expected_batch_turnaround_s=5.0,
                stream_max_retries=6, retry_backoff_base_s=0.05, retry_backoff_max_s=0.5,
                stream_idle_timeout_s=10, stream_lease_s=3.0, stream_redispatch_after_s=6.0,
                log_format="json", log_level="INFO",
            )
            self.settings_batch_max_attempts = settings.batch_max_attempts
            stack = Stack(settings, workdir=workdir / "stack")
            stack.workdir.mkdir(exist_ok=True)
            exits.callback(stack.stop)
            self.api_url = stack.start_api()
            procs = {"api": stack.processes[-1],
                     "worker-stream": stack.start_worker("stream", concurrency=16),
                     "worker-batch": stack.start_worker("batch"),
                     "beat": stack.start_beat()}
            plan = plan_requests(config, self.run_id, self.rng)
            cancel_rng = random.Random(config.seed + 1)
            self.cancel_targets = {
                i: cancel_rng.uniform(0.0, 1.0)
                for i in cancel_rng.sample(range(len(plan)), min(config.cancels, len(plan)))}
            threads = [
                threading.Thread(target=self._submitter, args=(plan,), daemon=True),
                threading.Thread(target=self._chaos,
                                 args=(stack, procs, store, random.Random(config.seed + 2)),
                                 daemon=True),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(config.submit_window_s + config.chaos_window_s + 120)
            self._heal(stack, procs)
            client = redis.Redis.from_url(settings.redis_url)
            exits.callback(client.close)
            self._wait_terminal(client, settings, stack, procs, time.monotonic()
                                + config.deadline_s)
            self._verify(client, settings, sim, plan)
            self.report.seconds = time.monotonic() - started
            if self.report.problems:
                self.log(stack.logs()[-8000:])
            delete_prefix(settings.redis_url, settings.key_prefix)
        return self.report

    def _wait_terminal(self, client: redis.Redis, settings: Settings, stack: Stack,
                       procs: dict[str, ManagedProcess], deadline: float) -> None:
        keys = Keys(settings.key_prefix)
        waiting = set(self.accepted.values())
        while waiting and time.monotonic() < deadline:
            pipe = client.pipeline(transaction=False)
            ordered = sorted(waiting)
            for rid in ordered:
                pipe.hget(keys.record(rid), "status")
            for rid, status in zip(ordered, pipe.execute(), strict=True):
                if status is not None and status.decode() in TERMINAL:
                    waiting.discard(rid)
            self._heal(stack, procs)
            time.sleep(0.5)
        for rid in sorted(waiting):
            status = client.hget(keys.record(rid), "status")
            self.report.problems.append(f"{rid} not terminal at the deadline: {status!r}")

    # -- verification --
    def _verify(self, client: redis.Redis, settings: Settings, sim: str,
                plan: list[Planned]) -> None:
        keys = Keys(settings.key_prefix)
        report = self.report
        report.accepted = len(self.accepted)
        records: dict[int, RequestRecord] = {}
        for index, rid in self.accepted.items():
            raw = client.hgetall(keys.record(rid))
            if not raw:
                report.problems.append(f"{rid} (#{index}) was accepted and then lost")
                continue
            record = RequestRecord.from_hash(raw)
            records[index] = record
            report.statuses[record.status] += 1
            report.by_route[record.route] += 1
            if record.status == "failed":
                report.failed_by_reason[record.error.code if record.error else "?"] += 1
            self._check_final_events(client, keys, record)
        for record in records.values():
            if record.id in self.cancels_acknowledged and record.status != "cancelled":
                report.problems.append(f"{record.id}: cancel answered 200 but it ended "
                                       f"{record.status}")
        self._check_answers(sim, plan, records)
        self._check_upstream_once(sim, plan, records)
        self._check_ledger(client, keys, records)

    def _check_final_events(self, client: redis.Redis, keys: Keys,
                            record: RequestRecord) -> None:
        finals = []
        entries: list[Any] = client.xrange(keys.events(record.id)) or []
        for _entry, fields in entries:
            event = orjson.loads(fields[b"d"])
            if event["type"] in FINAL_EVENT_TYPES:
                finals.append(event["type"])
        expected = FINAL_FOR_STATUS.get(record.status)
        if finals != [expected]:
            self.report.problems.append(
                f"{record.id} is {record.status} but its final events are {finals}")

    def _check_answers(self, sim: str, plan: list[Planned],
                       records: dict[int, RequestRecord]) -> None:
        completed = [(plan[i], r) for i, r in records.items() if r.status == "completed"]
        with running_simulator(seed=self.config.seed) as oracle_url:
            oracle = openai.OpenAI(base_url=oracle_url, api_key="sk-sim", max_retries=5)

            def expected(planned: Planned) -> str:
                answer = oracle.chat.completions.create(model=MODEL, messages=planned.messages)  # type: ignore[arg-type]
                return answer.choices[0].message.content or ""

            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(expected, [p for p, _ in completed]))
        for (planned, record), answer in zip(completed, answers, strict=True):
            content = record.result.content if record.result else None
            if content != answer:
                self.report.problems.append(
                    f"{record.id} (#{planned.index}, {record.route}) has the wrong content: "
                    f"{content!r:.120} != {answer!r:.120}")

    def _check_upstream_once(self, sim: str, plan: list[Planned],
                             records: dict[int, RequestRecord]) -> None:
        totals = sim_stats(sim)["totals"]
        self.report.upstream = {k: int(v) for k, v in totals.items() if isinstance(v, int)}
        for index, record in records.items():
            if record.route != "stream":
                continue
            stats = sim_stats(sim, prompt_hash(plan[index].messages))
            succeeded = int(stats["streams_completed"]) + int(stats["completions"])
            if succeeded > 1:
                self.report.problems.append(
                    f"{record.id} (#{index}) succeeded upstream {succeeded} times: {stats}")
        upstream = openai.OpenAI(base_url=sim, api_key="sk-sim", max_retries=5)
        successes: Counter[str] = Counter()
        submissions: Counter[str] = Counter()
        for batch in upstream.batches.list(limit=100):
            self.report.batches[batch.status] += 1
            for line in upstream.files.content(batch.input_file_id).text.splitlines():
                if line.strip():
                    submissions[orjson.loads(line)["custom_id"]] += 1
            if not batch.output_file_id:
                continue
            for line in upstream.files.content(batch.output_file_id).text.splitlines():
                if not line.strip():
                    continue
                item = orjson.loads(line)
                response = item.get("response") or {}
                if response.get("status_code") == 200:
                    successes[item["custom_id"]] += 1
        by_id = {r.id: r for r in records.values()}
        self._check_gave_up_after_all_attempts(by_id, submissions)
        self._check_always_failing_lines(plan, records, submissions)
        for custom_id, count in successes.items():
            owner = by_id.get(custom_id)
            if count > 1:
                self.report.problems.append(f"{custom_id} succeeded in {count} batches")
            if owner is not None and owner.route == "batch" and owner.status == "failed":
                self.report.problems.append(
                    f"{custom_id} succeeded in a batch but ended failed: {owner.error}")

    def _check_gave_up_after_all_attempts(self, by_id: dict[str, RequestRecord],
                                          submissions: Counter[str]) -> None:
        """Every batch attempt a request used up was a real upstream submission."""
        limit = self.settings_batch_max_attempts
        for rid, record in by_id.items():
            if record.route != "batch":
                continue
            if record.attempts > submissions[rid]:
                self.report.problems.append(
                    f"{rid} counts {record.attempts} attempts but was in only "
                    f"{submissions[rid]} upstream batches")
            if record.status == "failed" and record.attempts >= limit:
                self.report.gave_up.append(
                    f"{rid}: {record.error.code if record.error else '?'} after "
                    f"{submissions[rid]} batches")

    def _check_always_failing_lines(self, plan: list[Planned],
                                    records: dict[int, RequestRecord],
                                    submissions: Counter[str]) -> None:
        """A line that fails in every batch is retried exactly up to the limit, then fails. It
        may have been sent more often than that: a batch that failed as a whole is split and
        sent again without using its requests' attempts (`workers.batch_split`)."""
        limit = self.settings_batch_max_attempts
        for index, record in records.items():
            if "line_error=1" not in plan[index].content or record.status == "cancelled":
                continue
            if (record.status, record.attempts) != ("failed", limit) or \
                    submissions[record.id] < limit:
                self.report.problems.append(
                    f"{record.id} (always failing line) is {record.status} after "
                    f"{record.attempts} attempts / {submissions[record.id]} batches, "
                    f"expected failed after {limit}")

    def _check_ledger(self, client: redis.Redis, keys: Keys,
                      records: dict[int, RequestRecord]) -> None:
        ledger = Ledger.from_hash(client.hgetall(keys.ledger()))
        for route in ("stream", "batch"):
            mine = [r for r in records.values() if r.route == route and r.cost_usd is not None]
            cost = sum((r.cost_usd for r in mine if r.cost_usd is not None), Decimal(0))
            tokens = sum(r.usage.completion_tokens for r in mine if r.usage is not None)
            line = ledger.total(route)
            if cost != line.cost_usd or tokens != line.completion_tokens:
                self.report.problems.append(
                    f"ledger {route}: records cost {cost} / {tokens} completion tokens, "
                    f"ledger {line.cost_usd} / {line.completion_tokens}")


@contextmanager
def _timer(label: str) -> Iterator[None]:
    start = time.monotonic()
    yield
    print(f"{label}: {time.monotonic() - start:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="thousands of requests, many kills")
    parser.add_argument("--low", type=int)
    parser.add_argument("--high", type=int)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    config = ChaosConfig.long(args.seed) if args.long else ChaosConfig(seed=args.seed)
    if args.low is not None:
        config.low = args.low
    if args.high is not None:
        config.high = args.high
    with _timer("chaos run"):
        report = ChaosRun(config).run()
    for line in report.lines():
        print(line)
    for problem in report.problems[:50]:
        print("PROBLEM", problem)
    for line in report.gave_up[:20]:
        print("gave up:", line)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
