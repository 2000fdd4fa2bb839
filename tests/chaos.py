"""Nothing lost, nothing doubled: a mixed run under upstream faults, crashes and Redis outages.

The run (short form in CI through tests/test_chaos.py, long form from the command line):

    python -m tests.chaos --long            # thousands of low, hundreds of high requests
    python -m tests.chaos --low 300 --high 40 --seed 7

1. A private redis-server with ``--appendonly yes --appendfsync always``, a chaos simulator
   injecting 429s, 5xx, mid-stream drops, failed, expired and partly errored batches (rates,
   seeded, plus per-prompt directives), and the router's real processes: API, stream worker (at
   its default concurrency), batch worker, beat.
2. Requests are submitted over HTTP with an idempotency key each, retried until accepted
   (a submit during a Redis outage fails and is retried: the key makes that safe). A few are
   cancelled on the way. A sample of the high ones is followed over SSE by clients that, like
   a browser's EventSource, reconnect with ``Last-Event-ID`` to wherever the API now is.
3. Meanwhile, at seeded random moments, the API, the stream worker, the batch worker and beat are
   SIGKILLed and restarted, and Redis itself is SIGKILLed and restarted on the same port and dir
   after an outage of up to 10 s (at least one of 5-10 s). A process that exits on its own is
   restarted and counted as a problem.
4. Then, within a deadline, every accepted request must be terminal, and:
   - its replay log holds exactly one final event, of the kind its status says;
   - a failed one failed for a reason the injected faults explain (`EXPECTED_FAILURES`: never
     ``internal_error``, ``publish_failed`` or ``worker_lost``), a batch one only after all its
     attempts;
   - completed ones carry exactly their own answer (a fault-free oracle simulator with the same
     seed gives the deterministic answer for each prompt, through the openai SDK);
   - each SSE follower received every event once, in order (seqs 1, 2, 3... across its
     reconnections), exactly the replay log, and for a completed request exactly its text;
   - nothing was paid twice: per prompt, at most one full answer upstream (completed streams +
     completions - completed continuations <= 1; a resumed stream's continuation is not a second
     answer) in the stream lane (`/sim/stats`), and per request id at most one successful line
     over every batch output file (batch lane, read back through the Files API);
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
from collections.abc import Callable, Iterator
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

from hybrid_router.router.core.events import FINAL_EVENT_TYPES
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import running_simulator, sim_stats
from tests.support import ManagedProcess, Stack, delete_prefix, free_port, start_redis_server

TERMINAL = frozenset({"completed", "failed", "cancelled"})
FINAL_FOR_STATUS = {"completed": "done", "failed": "error", "cancelled": "cancelled"}
MODEL = "gpt-4o-mini"

# Why a request may legitimately end `failed`, per route, given the faults this run injects.
# Stream lane (workers/stream/relay.py `_classify`): the upstream's 429/5xx, a connection refused or
# cut, or an idle stall, once the retry budget is spent. Not expected: `internal_error` (a bug),
# `publish_failed` (Redis outages are to be ridden out), `worker_lost` (a stream outlives its
# worker unless it lost more workers than ROUTER_STREAM_MAX_RETRIES, which this run's few kills
# never reach), `timeout` (the total timeout is far away), `dispatch_unavailable` (intake).
# Batch lane (workers/batch/writeback.py, workers/batch/poll.py `_reason`): the last attempt's
# line error (`server_error`: a per-line 500), or the batch's own end when the last batch failed
# (`simulated_validation_failure`) or expired (`batch_expired`); only once the request has used
# every attempt (checked separately).
EXPECTED_FAILURES: dict[str, frozenset[str]] = {
    "stream": frozenset({"upstream_429", "upstream_500", "upstream_502", "upstream_503",
                         "upstream_504", "upstream_unavailable", "upstream_timeout",
                         "stream_interrupted"}),
    "batch": frozenset({"server_error", "simulated_validation_failure", "batch_expired",
                        "batch_cancelled"}),
}
SUBMIT_PATIENCE_S = 60.0  # a submission is retried this long before it counts as refused
SUBMIT_THREADS = 16  # clients submitting at once (they catch up after an outage)
SSE_KEEPALIVE_S = 5.0  # the run's ROUTER_SSE_KEEPALIVE_S
SSE_READ_TIMEOUT_S = 3 * SSE_KEEPALIVE_S  # no keep-alive for this long: the connection is dead


@dataclass
class ChaosConfig:
    low: int = 300
    high: int = 40
    seed: int = 1
    submit_window_s: float = 25.0  # submissions are spread over this long
    chaos_window_s: float = 35.0  # kills and restarts happen in this window
    process_kills: int = 8  # SIGKILLs of API / stream worker / batch worker / beat, in total
    redis_restarts: int = 2
    # Each Redis outage lasts a seeded time in `redis_down_s`; at least one of them is long
    # (`long_outage_s`): longer than the run's stream lease (3 s) and flush interval (2 s) together.
    redis_down_s: tuple[float, float] = (0.5, 10.0)
    long_outage_s: tuple[float, float] = (5.0, 10.0)
    cancels: int = 8
    sse_followers: int = 40  # high requests followed over SSE (a seeded sample)
    stream_concurrency: int | None = None  # None: the stream worker's default
    deadline_s: float = 120.0  # after the chaos window, for everything to become terminal
    workdir: Path | None = None
    submit_threads: int = SUBMIT_THREADS

    @classmethod
    def long(cls, seed: int = 1) -> ChaosConfig:
        return cls(low=3000, high=300, seed=seed, submit_window_s=150, chaos_window_s=180,
                   process_kills=40, redis_restarts=4, cancels=60, sse_followers=120,
                   deadline_s=400)


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
    redis_outages_s: list[float] = field(default_factory=list)
    sse: Counter[str] = field(default_factory=Counter)
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
            f"kills {dict(self.kills)}; redis restarts {self.redis_restarts} (down "
            f"{', '.join(f'{s:.1f}' for s in self.redis_outages_s)} s); "
            f"unexpected exits {dict(self.unexpected_exits)}",
            f"sse followers {dict(self.sse)}",
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
            elif roll < 0.7:
                # Long enough (6 s) that a few streams are always under way when a stream
                # worker is killed or Redis goes away.
                directive = " [[sim:tokens=60,tps=10]]"
        elif roll < 0.01:
            directive = " [[sim:line_error=1]]"
        content = f"chaos {run_id} #{i} {priority}{directive}"
        out.append(Planned(i, priority, content, f"chaos-{run_id}-{i}"))
    return out


# --- SSE followers --------------------------------------------------------------------------------

def read_sse(response: httpx.Response) -> Iterator[dict[str, Any] | None]:
    """The events of an SSE response, None for each comment (keep-alive); `id` and `event`
    checked to agree with the event's own `seq` and `type`."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            yield None
        elif line == "":
            if fields:
                event: dict[str, Any] = orjson.loads(fields.get("data", "null"))
                if not isinstance(event, dict) or fields.get("id") != str(event.get("seq")) \
                        or fields.get("event") != event.get("type"):
                    raise AssertionError(f"malformed SSE event {fields}")
                yield event
                fields = {}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


@dataclass
class SseFollower:
    """One client of `GET /v1/requests/{id}/events`, as a browser's EventSource behaves: when
    the connection breaks (the API was killed, or answered 5xx during a Redis outage) it
    connects again to wherever the API now is, sending `Last-Event-ID`, and stops after the
    final event. It keeps every event it received, in order, with the connection it came on."""

    request_id: str
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    connections: int = 0
    refused: Counter[int] = field(default_factory=Counter)  # non-200 answers, by status
    cut: int = 0  # connections that failed or ended before the final event
    finished: bool = False
    error: str = ""

    @property
    def last_seq(self) -> int:
        return int(self.events[-1][1]["seq"]) if self.events else 0

    def follow(self, api_url: Callable[[], str], stop: threading.Event) -> None:
        """Follow until the final event or `stop`; `api_url()` is where the API is now."""
        try:
            while not self.finished and not stop.is_set():
                if not self._connect(api_url(), stop):
                    stop.wait(0.2)  # EventSource's reconnection delay (not an assertion)
        except Exception as exc:  # reported by the run's verification
            self.error = f"{type(exc).__name__}: {exc}"

    def _connect(self, base: str, stop: threading.Event) -> bool:
        """One connection; True once the final event came."""
        headers = {"Last-Event-ID": str(self.last_seq)} if self.events else {}
        self.connections += 1
        timeout = httpx.Timeout(10.0, read=SSE_READ_TIMEOUT_S)
        url = f"{base}/v1/requests/{self.request_id}/events"
        try:
            with httpx.stream("GET", url, headers=headers, timeout=timeout) as response:
                if response.status_code != 200:
                    self.refused[response.status_code] += 1
                    return False
                for event in read_sse(response):
                    if event is not None:
                        self.events.append((self.connections, event))
                        if event["type"] in FINAL_EVENT_TYPES:
                            self.finished = True
                            return True
                    if stop.is_set():
                        return False
        except httpx.HTTPError:
            pass
        self.cut += 1
        return False


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
        self.accepted_at: dict[int, float] = {}  # plan index -> when (monotonic)
        self.first_try_at: dict[int, float] = {}  # plan index -> its first try (monotonic)
        self.retried_before_accepted: dict[int, int] = {}  # plan index -> failed tries first
        self.submit_patience_s = SUBMIT_PATIENCE_S
        self.lock = threading.Lock()  # one chaos action at a time vs. process bookkeeping
        self.stop_event = threading.Event()
        self.submissions_stop = threading.Event()  # the run is over: stop submitting
        self.cancel_targets: dict[int, float] = {}  # plan index -> seconds after acceptance
        self.cancels_acknowledged: set[str] = set()
        self.settings_batch_max_attempts = 0
        self.api_url = ""
        self.follow_indices: set[int] = set()  # plan indices followed over SSE
        self.followers: dict[str, SseFollower] = {}  # request id -> its follower
        self.follower_threads: list[threading.Thread] = []
        self.followers_stop = threading.Event()

    # -- submitting --
    def _submit_one(self, planned: Planned) -> None:
        """Submit until accepted, for up to `SUBMIT_PATIENCE_S` from the first try (a client's
        patience: the time its own submission waited behind others' does not count)."""
        body = {"priority": planned.priority, "messages": planned.messages, "model": MODEL,
                "idempotency_key": planned.idempotency_key}
        first_try = time.monotonic()
        deadline = first_try + self.submit_patience_s
        attempt = 0
        while time.monotonic() < deadline and not self.submissions_stop.is_set():
            try:
                response = httpx.post(f"{self._submit_url(planned, attempt)}/v1/requests",
                                      json=body, timeout=httpx.Timeout(10.0, connect=2.0))
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code in (200, 202):
                request_id = response.json()["id"]
                with self.lock:
                    if self.submissions_stop.is_set():  # the run is being checked already
                        return
                    self.accepted[planned.index] = request_id
                    self.accepted_at[planned.index] = time.monotonic()
                    self.first_try_at[planned.index] = first_try
                    self.retried_before_accepted[planned.index] = attempt
                if planned.index in self.follow_indices:
                    self._start_follower(request_id)
                if planned.index in self.cancel_targets:
                    self._cancel(request_id, self.cancel_targets[planned.index])
                return
            attempt += 1
            with self.lock:
                self.report.submit_retries += 1
            time.sleep(0.2)
        self.report.problems.append(
            f"request #{planned.index} not accepted in {self.submit_patience_s:g} s of retries")

    def _submit_url(self, _planned: Planned, _attempt: int) -> str:
        """Where a submission goes (the API moves to a new port after each kill)."""
        return self.api_url

    def _submitter(self, plan: list[Planned]) -> None:
        start = time.monotonic()
        gap = self.config.submit_window_s / max(1, len(plan))
        with ThreadPoolExecutor(self.config.submit_threads) as pool:
            for i, planned in enumerate(plan):
                delay = start + i * gap - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._submit_one, planned)

    def _start_follower(self, request_id: str) -> None:
        follower = SseFollower(request_id)
        thread = threading.Thread(target=follower.follow,
                                  args=(self._follow_url(request_id), self.followers_stop),
                                  daemon=True)
        with self.lock:
            self.followers[request_id] = follower
            self.follower_threads.append(thread)
        thread.start()

    def _follow_url(self, _request_id: str) -> Callable[[], str]:
        """Where a follower finds the API now (it moves to a new port after each kill)."""
        return lambda: self.api_url

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
        outages = self._outage_plan(rng)
        order = sorted(procs)
        rng.shuffle(order)
        targets = itertools.cycle(order)  # every kind of process gets killed
        start = time.monotonic()
        for at, action in zip(times, actions, strict=True):
            while time.monotonic() - start < at:
                if self.stop_event.wait(0.05):
                    return
            if action == "redis":
                down_s = outages.pop()
                self.log(f"[chaos {time.monotonic() - start:5.1f}s] SIGKILL redis, restart "
                         f"in {down_s:.1f}s")
                store.crash_and_restart(down_s=down_s)
                self.report.redis_restarts += 1
                self.report.redis_outages_s.append(down_s)
            else:
                name = next(targets)
                self.log(f"[chaos {time.monotonic() - start:5.1f}s] SIGKILL {name}, restart")
                procs[name].kill(signal.SIGKILL)
                self.report.kills[name] += 1
                time.sleep(rng.uniform(0.2, 1.5))
                procs[name] = self._start(stack, name)
            self._heal(stack, procs)

    def _outage_plan(self, rng: random.Random) -> list[float]:
        """How long each Redis outage lasts (seconds, popped in turn): seeded, at least one
        of them long."""
        n = self.config.redis_restarts
        if n == 0:
            return []
        outages = [rng.uniform(*self.config.long_outage_s)]
        outages += [rng.uniform(*self.config.redis_down_s) for _ in range(n - 1)]
        rng.shuffle(outages)
        return outages

    def _start(self, stack: Stack, name: str) -> ManagedProcess:
        if name == "api":  # a new port: clients follow `api_url`, like a load balancer would
            self.api_url = stack.start_api(timeout=60)
            return stack.processes[-1]
        if name == "beat":
            return stack.start_beat(timeout=60)
        return stack.start_worker(name.removeprefix("worker-"),
                                  concurrency=self.config.stream_concurrency
                                  if name == "worker-stream" else None,
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
                sse_keepalive_s=SSE_KEEPALIVE_S, log_format="json", log_level="INFO",
                # The checks compare what followers received with each request's replay log
                # entry by entry: keep the logs uncompacted for the whole run, however long the
                # machine makes it (compaction has its own tests: test_replay_compaction.py).
                replay_grace_s=3600,
            )
            self.settings_batch_max_attempts = settings.batch_max_attempts
            stack = Stack(settings, workdir=workdir / "stack")
            stack.workdir.mkdir(exist_ok=True)
            exits.callback(stack.stop)
            exits.callback(self.followers_stop.set)
            exits.callback(self.submissions_stop.set)  # no client left retrying after the run
            self.api_url = stack.start_api()
            procs = {"api": stack.processes[-1],
                     "worker-stream": self._start(stack, "worker-stream"),
                     "worker-batch": stack.start_worker("batch"),
                     "beat": stack.start_beat()}
            plan = plan_requests(config, self.run_id, self.rng)
            cancel_rng = random.Random(config.seed + 1)
            self.cancel_targets = {
                i: cancel_rng.uniform(0.0, 1.0)
                for i in cancel_rng.sample(range(len(plan)), min(config.cancels, len(plan)))}
            high = [p.index for p in plan if p.priority == "high"]
            self.follow_indices = set(random.Random(config.seed + 3).sample(
                high, min(config.sse_followers, len(high))))
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
            if threads[0].is_alive():
                self.report.problems.append("submissions still under way after the window")
            self._heal(stack, procs)
            client = redis.Redis.from_url(settings.redis_url)
            exits.callback(client.close)
            self._wait_terminal(client, settings, time.monotonic() + config.deadline_s,
                                lambda: self._heal(stack, procs))
            self._wait_followers(time.monotonic() + 30)
            self._verify(client, settings, sim, plan)
            self.report.seconds = time.monotonic() - started
            if self.report.problems:
                self.log(stack.logs()[-8000:])
            delete_prefix(settings.redis_url, settings.key_prefix)
        return self.report

    def _wait_terminal(self, client: redis.Redis, settings: Settings, deadline: float,
                       tick: Callable[[], None]) -> None:
        """Until every accepted request is terminal or the deadline; `tick` between looks."""
        keys = Keys(settings.key_prefix)
        waiting = set(self.accepted.values())
        while waiting and time.monotonic() < deadline:
            ordered = sorted(waiting)
            pipe = client.pipeline(transaction=False)
            for rid in ordered:
                pipe.hget(keys.record(rid), "status")
            try:
                statuses = pipe.execute()
            except redis.RedisError:  # Redis between masters: look again
                statuses = [None] * len(ordered)
            for rid, status in zip(ordered, statuses, strict=True):
                if status is not None and status.decode() in TERMINAL:
                    waiting.discard(rid)
            tick()
            time.sleep(0.5)
        for rid in sorted(waiting):
            status = client.hget(keys.record(rid), "status")
            self.report.problems.append(f"{rid} not terminal at the deadline: {status!r}")

    def _wait_followers(self, deadline: float) -> None:
        """Every request is terminal now: each follower gets its final event soon (at the
        latest after one reconnection); the verification reports those that did not."""
        with self.lock:
            threads = list(self.follower_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.followers_stop.set()
        for thread in threads:  # each notices `stop` at its next keep-alive at the latest
            thread.join(max(0.0, deadline + SSE_READ_TIMEOUT_S + 10 - time.monotonic()))

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
                self._check_failure(record)
            self._check_final_events(client, keys, record)
        for record in records.values():
            if record.id in self.cancels_acknowledged and record.status != "cancelled":
                report.problems.append(f"{record.id}: cancel answered 200 but it ended "
                                       f"{record.status}")
        for name, count in report.unexpected_exits.items():
            report.problems.append(f"{name} exited on its own {count} time(s)")
        self._check_followers(client, keys, records)
        self._check_answers(sim, plan, records)
        self._check_upstream_once(sim, plan, records)
        self._check_ledger(client, keys, records)

    def _check_failure(self, record: RequestRecord) -> None:
        """A failed request failed for a reason the injected faults explain."""
        code = record.error.code if record.error else "?"
        self.report.failed_by_reason[f"{record.route}:{code}"] += 1
        if code not in EXPECTED_FAILURES.get(record.route, frozenset()):
            self.report.problems.append(
                f"{record.id} ({record.route}) failed for an unexpected reason: {record.error}")
        elif record.route == "batch" and record.attempts < self.settings_batch_max_attempts:
            self.report.problems.append(
                f"{record.id} (batch) failed after {record.attempts} of "
                f"{self.settings_batch_max_attempts} attempts: {record.error}")

    def _check_followers(self, client: redis.Redis, keys: Keys,
                         records: dict[int, RequestRecord]) -> None:
        """What each SSE client received across its reconnections: every event once, in order
        (seqs 1, 2, 3... with no gap and no repeat), exactly the replay log, ending with the
        final event its request's status says; for a completed request, exactly its text."""
        by_id = {r.id: r for r in records.values()}
        sse = self.report.sse
        for rid, follower in sorted(self.followers.items()):
            sse["followers"] += 1
            sse["connections"] += follower.connections
            sse["cut"] += follower.cut
            for status, count in follower.refused.items():
                sse[f"refused_{status}"] += count
            sse["events"] += len(follower.events)
            record = by_id.get(rid)
            problem = self._follower_problem(client, keys, follower, record)
            if problem:
                sse["bad"] += 1
                self.report.problems.append(f"{rid} SSE follower: {problem}")
            elif record is not None and record.status == "completed":
                sse["completed_texts_equal"] += 1

    @staticmethod
    def _follower_problem(client: redis.Redis, keys: Keys, follower: SseFollower,
                          record: RequestRecord | None) -> str:
        events = [event for _conn, event in follower.events]
        if follower.error:
            return follower.error
        if record is None:
            return "no record"
        seqs = [int(event["seq"]) for event in events]
        if seqs != list(range(1, len(seqs) + 1)):
            bad = next(i for i, seq in enumerate(seqs) if seq != i + 1)
            return (f"seqs not consecutive at #{bad}: {seqs[max(0, bad - 3):bad + 3]} "
                    f"(connections {[c for c, _ in follower.events[max(0, bad - 3):bad + 3]]})")
        if not follower.finished:
            return (f"no final event (got {len(events)} events over {follower.connections} "
                    f"connections, record {record.status})")
        entries: list[Any] = client.xrange(keys.events(record.id)) or []
        logged = [orjson.loads(fields[b"d"]) for _entry, fields in entries]
        if events != logged:
            return f"received {len(events)} events, not the replay log's {len(logged)}"
        if events[-1]["type"] != FINAL_FOR_STATUS.get(record.status):
            return f"ended with {events[-1]['type']} but the request is {record.status}"
        if record.status == "completed":
            text = "".join(str(e.get("content", "")) for e in events if e["type"] == "token")
            content = record.result.content if record.result else None
            if text != content:
                return f"text {text!r:.80} != the record's {content!r:.80}"
        return ""

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
            # A resumed stream (after a drop, or on a new worker after its worker died) ends
            # with a continuation: the prompt plus the text so far as an assistant prefill,
            # which the upstream answers with the rest only. What must not happen is the prompt
            # answered in full twice (the answer paid twice).
            stats = sim_stats(sim, prompt_hash(plan[index].messages))
            full = (int(stats["streams_completed"]) + int(stats["completions"])
                    - int(stats["continuations_completed"]))
            if full > 1:
                self.report.problems.append(
                    f"{record.id} (#{index}) was answered in full upstream {full} times: {stats}")
            if record.status == "completed" and full + int(stats["continuations_completed"]) < 1:
                self.report.problems.append(
                    f"{record.id} (#{index}) completed but no upstream stream finished: {stats}")
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
        sent again without using its requests' attempts (`hybrid_router.workers.batch.split`)."""
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
