"""Test helper: run a real simulator in a subprocess for the duration of a ``with`` block.

A subprocess (not a thread) so the simulator has its own event loop and GIL, exactly like a real
upstream, and so a hung test cannot wedge it. Readiness is polled with a deadline instead of a
blind sleep; on exit the process is terminated and reaped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from hybrid_router.simulator.config import SimConfig

STARTUP_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def simulator_env(overrides: dict[str, Any]) -> dict[str, str]:
    """The environment of a simulator subprocess with ``overrides`` as ``SIM_*`` variables."""
    unknown = set(overrides) - set(SimConfig.model_fields)
    if unknown:
        raise TypeError(f"unknown simulator setting(s): {sorted(unknown)}")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for key, value in overrides.items():
        env["SIM_" + key.upper()] = _env_value(value)
    return env


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float,
               api_key: str = "sk-sim") -> None:
    """Poll ``GET /v1/models`` until it answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited early with code {proc.returncode}")
            try:
                r = client.get(base_url + "/models",
                               headers={"Authorization": f"Bearer {api_key}"})
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulator at {base_url} not ready after {timeout} s")
            time.sleep(0.05)


@contextlib.contextmanager
def running_simulator(host: str = "127.0.0.1", port: int | None = None,
                      **config_overrides: Any) -> Iterator[str]:
    """Start ``python -m hybrid_router.simulator`` on a free port; yield its base URL (ending in ``/v1``).

    ``config_overrides`` are :class:`SimConfig` fields (``ttft_s=0.1``, ``batch_api=False``...).
    """
    port = port or free_port(host)
    env = simulator_env(config_overrides)
    keys = config_overrides.get("api_keys") or ["sk-sim"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulator", "--host", host, "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
        base_url = f"http://{host}:{port}/v1"
        try:
            try:
                wait_ready(base_url, proc, STARTUP_TIMEOUT_S, api_key=keys[0])
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                tail = log.read()[-4000:].decode(errors="replace")
                raise RuntimeError(f"{exc}\n--- simulator stderr ---\n{tail}") from None
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def sim_stats(base_url: str, prompt_hash: str | None = None) -> dict[str, Any]:
    """``GET /sim/stats`` of the simulator at ``base_url`` (the ``.../v1`` URL is accepted)."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    params = {"prompt_hash": prompt_hash} if prompt_hash else None
    r = httpx.get(root + "/sim/stats", params=params, timeout=5.0)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def sim_last_request(base_url: str, prompt_hash: str) -> dict[str, Any]:
    """The last chat-completion body the simulator received for the prompt, as it arrived."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    r = httpx.get(root + "/sim/last_request", params={"prompt_hash": prompt_hash}, timeout=5.0)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data
