"""`hybrid-router up`: the whole router on one machine, in one terminal, for development.

A small supervisor (in the spirit of honcho / docker compose): it picks a Redis (the configured
one if it answers, else a private ``redis-server``), an upstream (the configured one if a key is
set, else the built-in simulator), starts the API, a stream worker, a batch worker, beat and
Flower as subprocesses with the *same* settings (`settings_to_env`), waits until each is ready
(with deadlines), prints where everything is, and on Ctrl-C / SIGTERM stops every process
group it started: terminate, wait, kill what is left. If any child dies, it says which and
why in one line, stops the rest, and exits 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO

import httpx
import redis
from pydantic import SecretStr

from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.redis_io import safe_url, sync_client
from hybrid_router.settings import Settings, settings_to_env

log = get_logger(__name__)

SIM_API_KEY = "sk-hybrid-router-simulator"
# Dev defaults `up` applies when the user did not set them (only on the simulator, whose
# batches finish in seconds; on a real upstream a batch takes minutes to hours anyway).
SIM_DEV_DEFAULTS: dict[str, float] = {
    "flush_interval_s": 10.0,
    "poll_interval_s": 2.0,
    # The classifier streams a low request whose deadline is shorter than flush + turnaround;
    # against the simulator a batch round trip is seconds, not the real API's hour.
    "expected_batch_turnaround_s": 30.0,
}
# How the simulator streams unless SIM_* says otherwise: slow enough to see tokens arrive.
SIM_STREAM_DEFAULTS: dict[str, str] = {"SIM_TTFT_S": "0.2", "SIM_TOKENS_PER_S": "40"}


INTERRUPTED = 130  # Ctrl-C before everything was ready: a clean stop, but not a success


class UpError(Exception):
    """`up` cannot go on; `exit_code` 2 = environment/usage problem, 1 = a child failed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class UpOptions:
    host: str
    port: int
    flower_port: int | None = None
    sim_port: int | None = None
    redis_port: int | None = None
    log_dir: Path | None = None
    show_logs: bool = True
    ready_timeout_s: float = 60.0
    force_sim: bool = False
    sim_batch_turnaround_s: float | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_host(host: str) -> str:
    """Where to connect to a server listening on `host` (wildcards mean this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def ensure_port_free(host: str, port: int, flag: str) -> None:
    """Fail before starting anything when a port we were told to use is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UpError(f"cannot listen on {host}:{port} ({exc.strerror}); another process uses "
                          f"it: stop it or pass {flag} <another port>", exit_code=2) from exc


def is_simulator(base_url: str, timeout: float = 1.0) -> bool:
    """Whether an upstream base URL is the built-in simulator (it answers ``GET /sim/config``,
    which no real OpenAI-compatible API serves), however it was started."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        response = httpx.get(f"{root}/sim/config", timeout=timeout)
        return response.status_code == 200 and isinstance(response.json(), dict)
    except (httpx.HTTPError, ValueError):
        return False


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client = sync_client(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _die_with_parent() -> None:
    """In the child before exec: a new session (own process group) and, on Linux, SIGTERM when
    `up` itself dies without cleaning up (kill -9), so nothing is orphaned."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One supervised process, its log file, and how to tell it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[Child], bool]
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    _pump: threading.Thread | None = None

    def start(self, echo: TextIO | None) -> None:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent, close_fds=True,
        )
        self._pump = threading.Thread(target=self._copy_output, args=(echo,),
                                      name=f"up-{self.name}", daemon=True)
        self._pump.start()

    def _copy_output(self, echo: TextIO | None) -> None:
        """Copy the child's output to its log file (and, prefixed, to the terminal)."""
        assert self.proc is not None and self.proc.stdout is not None
        stream: IO[bytes] = self.proc.stdout
        with self.log_path.open("ab") as log_file:
            for line in iter(stream.readline, b""):
                log_file.write(line)
                log_file.flush()
                if echo is not None:
                    with contextlib.suppress(ValueError, OSError):
                        echo.write(f"{self.name:>13} | {line.decode(errors='replace')}")
                        echo.flush()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Supervisor:
    """Starts, watches and stops the children of one `up`."""

    settings: Settings
    options: UpOptions
    out: TextIO = field(default_factory=lambda: sys.stdout)
    children: list[Child] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hybrid-router-up-")))
    # Data that is not a log (the private Redis's directory, beat's schedule): deleted at exit.
    scratch: list[Path] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _stop_reason: str = ""

    # --- plan --------------------------------------------------------------------------------
    def _base_env(self, settings: Settings) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "OPENAI_"))}
        env.update(settings_to_env(settings))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _child(self, name: str, argv: list[str], env: dict[str, str],
               ready: Callable[[Child], bool], url: str = "") -> Child:
        child = Child(name, argv, env, self.workdir / f"{name}.log", ready, url)
        self.children.append(child)
        return child

    def choose_redis(self) -> str:
        url = self.settings.redis_url
        if redis_answers(url):
            self.notes.append(("Redis", f"{safe_url(url)}  (ROUTER_REDIS_URL)"))
            return url
        binary = shutil.which("redis-server")
        if binary is None:
            raise UpError(
                f"Redis at {safe_url(url)} does not answer and no redis-server is on PATH. "
                "Either install one (apt-get install redis-server, or "
                "docker run -d -p 6379:6379 redis:7) or point ROUTER_REDIS_URL at a running Redis.",
                exit_code=2,
            )
        port = self.options.redis_port or free_port()
        data_dir = Path(tempfile.mkdtemp(prefix="redis-", dir=self.workdir))
        self.scratch.append(data_dir)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no"]
        private = f"redis://127.0.0.1:{port}/0"
        child = self._child("redis", argv, dict(os.environ), lambda _c: redis_answers(private),
                            private)
        child.start(None)
        self._wait_ready([child])
        self.notes.append(("Redis", f"{private}  private redis-server: {safe_url(url)} did not "
                                    "answer; its data is discarded at exit"))
        return private

    def choose_upstream(self) -> dict[str, Any]:
        """Settings updates for the upstream; starts the simulator when there is no key.

        The development defaults (`SIM_DEV_DEFAULTS`) follow the simulator being the upstream,
        whether `up` starts it or the configured upstream is one started separately."""
        configured = self.settings.upstream_base_url
        if not self.options.force_sim and configured and is_simulator(configured):
            updates: dict[str, Any] = {}
            if self.settings.upstream_api_key is None:
                updates["upstream_api_key"] = SecretStr(SIM_API_KEY)
            self.notes.append(("upstream", f"SIMULATOR at {configured} (ROUTER_UPSTREAM_BASE_URL; "
                                           "started separately, so up leaves it running)"))
            return updates | self._dev_defaults()
        if self.settings.upstream_api_key is not None and not self.options.force_sim:
            self.notes.append(("upstream", f"{self.settings.effective_upstream_base_url}"))
            return {}
        port = self.options.sim_port or free_port()
        base = f"http://127.0.0.1:{port}/v1"
        env = dict(os.environ)
        for name, value in SIM_STREAM_DEFAULTS.items():
            env.setdefault(name, value)
        if self.options.sim_batch_turnaround_s is not None:
            env["SIM_BATCH_TURNAROUND_S"] = str(self.options.sim_batch_turnaround_s)
        headers = {"Authorization": f"Bearer {SIM_API_KEY}"}

        def ready(_c: Child) -> bool:
            try:
                return httpx.get(f"{base}/models", headers=headers, timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        child = self._child("simulator", [sys.executable, "-m", "simulator", "--host",
                                          "127.0.0.1", "--port", str(port)], env, ready, base)
        child.start(self._echo())
        self._wait_ready([child])
        why = "--sim given" if self.options.force_sim else "no upstream key is configured"
        self.notes.append(("upstream", f"SIMULATOR at {base} ({why}; set ROUTER_UPSTREAM_API_KEY "
                                       "or OPENAI_API_KEY to use a real OpenAI-compatible API)"))
        updates = {"upstream_base_url": base, "upstream_api_key": SecretStr(SIM_API_KEY)}
        return updates | self._dev_defaults()

    def _dev_defaults(self) -> dict[str, Any]:
        """`SIM_DEV_DEFAULTS` the user did not set, noted for the banner."""
        updates: dict[str, Any] = {}
        for name, seconds in SIM_DEV_DEFAULTS.items():
            if name not in self.settings.model_fields_set:
                updates[name] = seconds
        if updates:
            applied = ", ".join(f"{name}={seconds:g}" for name, seconds in updates.items())
            self.notes.append(("dev defaults", applied + " (the upstream is the simulator, whose "
                                               "batches finish in seconds; set the ROUTER_* "
                                               "variables to override)"))
        return updates

    def _echo(self) -> TextIO | None:
        return self.out if self.options.show_logs else None

    def start_router(self, settings: Settings) -> None:
        """API, both workers, beat and Flower, all with `settings`."""
        from hybrid_router.workers.celery_app import create_celery

        opts = self.options
        env = self._base_env(settings)
        if opts.show_logs and "log_format" not in self.settings.model_fields_set and self.out.isatty():
            env["ROUTER_LOG_FORMAT"] = "console"
        cli = [sys.executable, "-m", "hybrid_router.router.cli.main"]
        api_url = f"http://{local_host(opts.host)}:{opts.port}"
        self._child("api", [*cli, "api", "--host", opts.host, "--port", str(opts.port)], env,
                    lambda _c: _http_ok(f"{api_url}/readyz"), api_url)

        celery = create_celery(settings)
        hostname = socket.gethostname()
        for lane in ("stream", "batch"):
            node = f"{lane}-up{os.getpid()}@{hostname}"
            self._child(f"{lane}-worker", [*cli, "worker", "--lane", lane, "--name", node], env,
                        self._ping_ready(celery, node))

        schedule_dir = Path(tempfile.mkdtemp(prefix="beat-", dir=self.workdir))
        self.scratch.append(schedule_dir)
        self._child("beat", [*cli, "beat", "--schedule", str(schedule_dir / "schedule")], env,
                    self._beat_ready(settings))

        flower_port = opts.flower_port or free_port()
        flower_url = f"http://{local_host(opts.host)}:{flower_port}"
        flower_argv = [*cli, "flower", "--host", opts.host, "--port", str(flower_port)]
        if settings.flower_basic_auth is None:
            if local_host(opts.host) in ("127.0.0.1", "localhost", "::1"):
                flower_argv.append("--unauthenticated-api")
                auth_note = "no auth, local only; its HTTP API is open on this machine"
            else:
                auth_note = "no auth: set ROUTER_FLOWER_BASIC_AUTH=user:pass before exposing it"
        else:
            auth_note = "basic auth from ROUTER_FLOWER_BASIC_AUTH"
        self._child("flower", flower_argv, env, lambda _c: _http_ok(f"{flower_url}/healthcheck"),
                    flower_url)
        self.notes.append(("Flower", f"{flower_url}  ({auth_note})"))

        pending = [c for c in self.children if c.proc is None]
        for child in pending:
            child.start(self._echo())
        self._wait_ready(pending)

    @staticmethod
    def _beat_ready(settings: Settings) -> Callable[[Child], bool]:
        """Beat is ready once it has ticked: its report in Redis names this child's pid."""
        from hybrid_router.router.core.keys import Keys
        from hybrid_router.router.core.runtime_config import BeatReport

        def ready(child: Child) -> bool:
            client = sync_client(settings.redis_url, socket_timeout=1)
            try:
                report = BeatReport.from_hash(client.hgetall(Keys(settings.key_prefix).beat()))
            finally:
                client.close()
            return report is not None and report.pid == child.pid

        return ready

    @staticmethod
    def _ping_ready(celery: Any, node: str) -> Callable[[Child], bool]:
        def ready(_c: Child) -> bool:
            replies = celery.control.ping(destination=[node], timeout=0.5)
            return any(node in reply for reply in replies)

        return ready

    # --- watch -------------------------------------------------------------------------------
    def _wait_ready(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        waiting = list(children)
        while waiting:
            if self._stop.is_set():
                raise UpError(f"{self._stop_reason} received while starting; stopping",
                              exit_code=INTERRUPTED)
            for child in list(waiting):
                code = child.returncode()
                if code is not None:
                    raise UpError(self._death_line(child, code))
                with contextlib.suppress(Exception):
                    if child.ready(child):
                        waiting.remove(child)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(c.name for c in waiting)
                raise UpError(f"not ready after {self.options.ready_timeout_s:g}s: {names} "
                              f"(logs in {self.workdir})")
            if waiting:
                self._stop.wait(0.1)

    def _death_line(self, child: Child, code: int) -> str:
        tail = child.tail()
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0
               else f"exited with code {code}")
        return (f"{child.name} (pid {child.pid}) {how}; log: {child.log_path}"
                + (f"\n--- last lines of {child.name} ---\n{tail}" if tail else ""))

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()

    def watch(self) -> None:
        """Block until asked to stop (returns) or a child dies (raises UpError)."""
        while not self._stop.is_set():
            for child in self.children:
                code = child.returncode()
                if code is not None:
                    raise UpError(self._death_line(child, code))
            self._stop.wait(0.2)

    # --- stop --------------------------------------------------------------------------------
    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop the intake first, Redis last: SIGTERM each group, wait, SIGKILL what is left."""
        order = sorted(self.children, key=lambda c: c.name in ("redis", "simulator"))
        for child in order:
            if child.name not in ("redis", "simulator") and child.returncode() is None:
                child.signal_group(signal.SIGTERM)
        self._wait_exit([c for c in order if c.name not in ("redis", "simulator")], timeout)
        tail = [c for c in order if c.name in ("redis", "simulator")]
        for child in tail:
            child.signal_group(signal.SIGTERM)
        self._wait_exit(tail, timeout)
        for child in self.children:
            # Anything left in a child's process group (a pool process) goes too.
            child.signal_group(signal.SIGKILL)
            if child.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(5)
            if child._pump is not None:
                child._pump.join(2)

    @staticmethod
    def _wait_exit(children: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.signal_group(signal.SIGKILL)

    # --- banner ------------------------------------------------------------------------------
    def banner(self, settings: Settings) -> str:
        api = next(c for c in self.children if c.name == "api")
        lines = [
            "",
            "hybrid-router is up. Ctrl-C stops everything.",
            "",
            f"  {'API':<13}{api.url}",
            f"  {'API docs':<13}{api.url}/docs",
            f"  {'metrics':<13}{api.url}/metrics   (JSON: {api.url}/v1/stats)",
        ]
        lines += [f"  {label:<13}{text}" for label, text in self.notes]
        lines += [
            f"  {'key prefix':<13}{settings.key_prefix}",
            f"  {'flush':<13}every {self._flush_line(settings)}",
            f"  {'poll':<13}every {settings.poll_interval_s:g}s while batches are in flight",
            f"  {'auth':<13}" + ("on (ROUTER_API_KEYS)" if settings.auth_enabled
                                 else "OFF: ROUTER_API_KEYS is empty (development only)"),
            f"  {'logs':<13}{self.workdir}",
            "",
            "  processes:",
            *[f"    pid {c.pid:<8} {c.name}" for c in self.children],
            "",
            "  try:",
            f"    hybrid-router submit --url {api.url} --priority high 'Tell me a joke'",
            f"    hybrid-router submit --url {api.url} --priority low 'Summarise the news'",
            f"    {self._status_env(settings)}hybrid-router status",
            "",
        ]
        return "\n".join(lines)


    @staticmethod
    def _flush_line(settings: Settings) -> str:
        """The flush interval in force, as beat applies it, and where it comes from (a
        run-time override left in Redis outlives restarts: the banner must not hide it)."""
        from hybrid_router.router.core.runtime_config import read_flush_interval

        client = sync_client(settings.redis_url, socket_timeout=2)
        try:
            return read_flush_interval(client, settings)[0].describe()
        except redis.RedisError as exc:
            return f"{settings.flush_interval_s:g}s (ROUTER_FLUSH_INTERVAL_S; Redis unreadable: {exc})"
        finally:
            client.close()

    def _status_env(self, settings: Settings) -> str:
        """Environment a second terminal needs so `status` reads this Redis."""
        if settings.redis_url != self.settings.redis_url:
            return f"ROUTER_REDIS_URL={settings.redis_url} "
        return ""


def run_up(settings: Settings, options: UpOptions, out: TextIO | None = None) -> int:
    """Run everything until Ctrl-C / SIGTERM (exit 0) or a child dies (exit 1)."""
    sup = Supervisor(settings, options, out or sys.stdout)
    if options.log_dir is not None:
        shutil.rmtree(sup.workdir, ignore_errors=True)
        options.log_dir.mkdir(parents=True, exist_ok=True)
        sup.workdir = options.log_dir
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        sup.request_stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, on_signal)
    code = 0
    failed = False
    try:
        ensure_port_free(options.host, options.port, "--port")
        for port, flag in ((options.flower_port, "--flower-port"), (options.sim_port, "--sim-port"),
                           (options.redis_port, "--redis-port")):
            if port:
                ensure_port_free(options.host if flag == "--flower-port" else "127.0.0.1", port,
                                 flag)
        redis_url = sup.choose_redis()
        updates: dict[str, Any] = {"redis_url": redis_url, "api_port": options.port,
                                   "api_host": options.host}
        updates.update(sup.choose_upstream())
        effective = settings.model_copy(update=updates)
        sup.start_router(effective)
        sup.out.write(sup.banner(effective) + "\n")
        sup.out.flush()
        log.info("hybrid-router up: all processes ready",
                 processes={c.name: c.pid for c in sup.children})
        sup.watch()
        sup.out.write(f"\nhybrid-router up: {sup._stop_reason or 'stop'} received, stopping...\n")
    except UpError as exc:
        failed = exc.exit_code != INTERRUPTED
        code = exc.exit_code
        sys.stderr.write(f"hybrid-router up: {exc}\n")
    finally:
        sup.out.flush()
        sup.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for path in sup.scratch:  # not logs: the private Redis's data, beat's schedule
        shutil.rmtree(path, ignore_errors=True)
    if failed and sup.children:
        sys.stderr.write(f"hybrid-router up: everything stopped; logs kept in {sup.workdir}\n")
    elif sup.children:
        sup.out.write(f"hybrid-router up: stopped, no process left behind; logs kept in "
                      f"{sup.workdir}\n")
    elif options.log_dir is None:
        shutil.rmtree(sup.workdir, ignore_errors=True)  # nothing started, nothing logged
    sup.out.flush()
    return code
