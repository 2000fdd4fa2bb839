"""Test support: free ports, waiting on conditions with deadlines, and owned subprocesses.

Fixtures own every process they start: `ManagedProcess.stop()` terminates, waits, kills if
needed, and the `Stack` stops everything it started, so no test leaves a process behind.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings, settings_to_env

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | bool | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value  # type: ignore[return-value]
        except Exception as exc:  # the thing may not be up yet
            last_exc = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}{detail}")
        time.sleep(interval)


@dataclass
class ManagedProcess:
    """A subprocess with its output in a log file, stopped for sure by `stop()`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the whole process group (Celery pools have children)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.proc.wait(5)
        # Reap anything left in the group (e.g. a pool child that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a child process that reproduces `settings` exactly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROUTER_", "OPENAI_"))}
    env.update(settings_to_env(settings))
    env["ROUTER_LOG_FORMAT"] = "json"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hybrid_router.router.cli.main", *args]


def celery_argv(*args: str) -> list[str]:
    """Celery's own command line on the router's app (``celery -A hybrid_router.workers.celery_app ...``)."""
    return [sys.executable, "-m", "celery", "-A", "hybrid_router.workers.celery_app", *args]


def start_redis_server(workdir: Path, appendonly: bool = False, port: int | None = None,
                       extra_args: tuple[str, ...] = (), wait: bool = True,
                       ) -> tuple[ManagedProcess, str]:
    """A private redis-server on a free port; returns the process and its base URL.

    `port` (with the same `workdir`) restarts a server where a stopped one was, reloading its
    append-only file: the chaos test restarts Redis this way. `extra_args` go on the command line.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port() if port is None else port
    argv = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--dir", str(workdir),
        "--maxclients", "10000",
        *extra_args,
    ]
    proc = ManagedProcess("redis", argv, dict(os.environ), workdir / "redis.log").start()
    url = f"redis://127.0.0.1:{port}"

    if wait:  # else the caller waits on the server its own way (no plain port: `port=0`)
        wait_until(lambda: redis.Redis.from_url(url).ping(), 10, message="private redis-server")
    return proc, url


def start_tls_redis_server(workdir: Path, password: str | None = None
                           ) -> tuple[ManagedProcess, str, str]:
    """A private redis-server reachable only over TLS and a unix socket (no plain TCP port),
    with a self-signed certificate made here by ``openssl`` (and `password` required, if
    given); returns the process, a ``rediss://`` URL (that trusts the certificate:
    ``?ssl_ca_certs=``) and a ``unix://`` socket URL, both of database 0."""
    cert, key = workdir / "redis-cert.pem", workdir / "redis-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    socket_path = workdir / "redis.sock"
    port = free_port()
    proc, _url = start_redis_server(workdir, port=0, extra_args=(
        "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        *(("--requirepass", password) if password else ())), wait=False)
    login = f":{password}@" if password else ""
    tls_url = f"rediss://{login}127.0.0.1:{port}"
    unix_url = f"unix://{login}{socket_path}"
    from hybrid_router.router.core.redis_io import sync_client

    def pings(url: str) -> bool:
        try:
            return bool(sync_client(url).ping())
        except redis.ConnectionError:
            return False

    wait_until(lambda: pings(f"{unix_url}?db=0"), 10, message="redis-server (unix socket)")
    wait_until(lambda: pings(f"{tls_url}/0?ssl_ca_certs={cert}"), 10,
               message="redis-server (TLS)")
    return proc, f"{tls_url}/0?ssl_ca_certs={cert}", f"{unix_url}?db=0"


@dataclass
class Stack:
    """The router's processes for one set of settings: API, workers, beat (each optional)."""

    settings: Settings
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hr-stack-")))
    processes: list[ManagedProcess] = field(default_factory=list)
    api_url: str = ""

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None
               ) -> ManagedProcess:
        proc = ManagedProcess(name, argv, child_env(self.settings, extra_env),
                              self.workdir / f"{name}-{len(self.processes)}.log").start()
        self.processes.append(proc)
        return proc

    def start_api(self, timeout: float = 20.0, workers: int = 1) -> str:
        port = free_port()
        proc = self._spawn("api", cli_argv("api", "--host", "127.0.0.1", "--port", str(port),
                                           "--workers", str(workers)))
        self.api_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"api exited:\n{proc.output()[-3000:]}")
            return httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200

        wait_until(ready, timeout, 0.05, message=f"API at {self.api_url}")
        return self.api_url

    def start_worker(self, lane: str, concurrency: int | None = None,
                     timeout: float = 30.0, extra_env: dict[str, str] | None = None
                     ) -> ManagedProcess:
        node = f"{lane}-{len(self.processes)}"
        args = ["worker", "--lane", lane, "--name", f"{node}@%h"]
        if concurrency:
            args += ["--concurrency", str(concurrency)]
        proc = self._spawn(f"worker-{lane}", cli_argv(*args), extra_env)
        hostname = f"{node}@{socket.gethostname()}"
        wait_until(lambda: self._worker_ready(proc, hostname), timeout, 0.1,
                   message=f"{lane} worker ready")
        return proc

    def _worker_ready(self, proc: ManagedProcess, hostname: str) -> bool:
        """Ready when its log says so (INFO) or, at quieter log levels, when it answers a ping."""
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.output()[-3000:]}")
        if "ready" in proc.output():
            return True
        if self.settings.log_level in ("DEBUG", "INFO"):
            return False
        from hybrid_router.workers.celery_app import create_celery

        app = create_celery(self.settings)
        try:
            return bool(app.control.ping(destination=[hostname], timeout=0.5))
        finally:
            app.close()

    def start_celery_worker(self, *args: str, timeout: float = 30.0) -> tuple[ManagedProcess, str]:
        """A worker started the way Celery users do (``celery -A hybrid_router.workers.celery_app worker``
        plus `args`, e.g. ``-Q <queue>``); returns it and its node name."""
        hostname = f"celery-{len(self.processes)}@{socket.gethostname()}"
        proc = self._spawn("celery-worker", celery_argv("worker", "-n", hostname, *args))
        wait_until(lambda: self._worker_ready(proc, hostname), timeout, 0.1,
                   message="celery worker ready")
        return proc, hostname

    def start_flower(self, timeout: float = 30.0) -> str:
        """Flower on a free port with its HTTP API open (loopback only); returns its URL."""
        port = free_port()
        proc = self._spawn("flower", cli_argv("flower", "--host", "127.0.0.1", "--port", str(port),
                                              "--unauthenticated-api"))
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"flower exited:\n{proc.output()[-3000:]}")
            return httpx.get(f"{url}/healthcheck", timeout=1).status_code == 200

        wait_until(ready, timeout, 0.1, message=f"Flower at {url}")
        return url

    def start_beat(self, timeout: float = 30.0) -> ManagedProcess:
        schedule = self.workdir / f"beat-{len(self.processes)}"
        proc = self._spawn("beat", cli_argv("beat", "--schedule", str(schedule)))

        def ticked() -> bool:  # beat's own report in Redis names this process: it ticks
            if not proc.alive():
                raise RuntimeError(f"beat exited:\n{proc.output()[-3000:]}")
            from hybrid_router.router.core.keys import Keys
            from hybrid_router.router.core.runtime_config import BeatReport

            client = sync_client(self.settings.redis_url)
            try:
                report = BeatReport.from_hash(client.hgetall(Keys(self.settings.key_prefix).beat()))
            finally:
                client.close()
            return report is not None and report.pid == proc.pid

        wait_until(ticked, timeout, 0.1, message="beat ticking")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        """Stop every process and remove every key under the stack's prefix."""
        self.stop()
        delete_prefix(self.settings.redis_url, self.settings.key_prefix)

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output()[-4000:]}" for p in self.processes)


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Remove every key a test created under its private prefix (and Celery's under it)."""
    client = sync_client(redis_url)
    for pattern in (f"{prefix}:*", f"{prefix}.*"):
        batch: list[Any] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    client.close()


def without_fields(value: Any, names: frozenset[str]) -> Any:
    """JSON `value` without the object fields named `names`, at any depth (to compare two
    answers whose ids and timestamps each call makes anew)."""
    if isinstance(value, dict):
        return {k: without_fields(v, names) for k, v in value.items() if k not in names}
    if isinstance(value, list):
        return [without_fields(v, names) for v in value]
    return value
