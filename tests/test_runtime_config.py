"""The flush interval a user sees is the one in force, with where it comes from (issue 20).

A run-time override (`config set flush-interval`) lives in Redis and outlives restarts; every
view (`config get`, `status`, `/v1/stats`, `/metrics`) says so, and `config reset` removes it.
`config get` shows the running service's values as beat reports them, not the environment of
the CLI that asks. Beat's liveness is the age of its last tick (`beat --check`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable

import httpx
import pytest

from hybrid_router.settings import Settings
from tests.support import REPO_ROOT, Stack, child_env, cli_argv, wait_until


def run_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_argv(*args), env=child_env(settings, env), cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=60)


def config_get(settings: Settings, **env: str) -> dict[str, object]:
    done = run_cli(settings, "config", "get", **env)
    assert done.returncode == 0, done.stderr
    view: dict[str, object] = json.loads(done.stdout)
    return view


@pytest.mark.timeout(180)
def test_override_is_shown_with_its_origin_survives_a_restart_and_resets(
    make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack]
) -> None:
    settings = make_settings(flush_interval_s=60, poll_interval_s=2.5)
    # The CLI's own environment differs from the service's: what it shows must be beat's.
    cli_env = {"ROUTER_POLL_INTERVAL_S": "30", "ROUTER_FLUSH_INTERVAL_S": "77"}

    alone = config_get(settings, **cli_env)  # nothing reports yet: it says so
    assert alone["reported_by"] != "beat" and alone["beat"] is None
    assert "no beat has reported" in str(alone["reported_by"])

    stack = stack_factory(settings)
    beat = stack.start_beat()
    view = config_get(settings, **cli_env)
    assert view["reported_by"] == "beat"
    assert view["poll_interval_s"] == 2.5 and view["flush_interval_s"] == 60
    assert view["flush_interval"] == {"seconds": 60.0, "source": "ROUTER_FLUSH_INTERVAL_S",
                                      "set_at": None, "set_by": None, "setting_s": 60.0,
                                      "setting_of": "beat"}

    before = time.time()
    done = run_cli(settings, "config", "set", "flush-interval", "5")
    assert done.returncode == 0, done.stderr
    view = config_get(settings, **cli_env)
    flush = view["flush_interval"]
    assert isinstance(flush, dict)
    assert view["flush_interval_s"] == 5 and view["flush_interval_overridden"] is True
    assert flush["source"] == "run-time override" and flush["setting_s"] == 60
    assert flush["set_by"].startswith("cli ") and before <= flush["set_at"] <= time.time()

    # Restart beat: the override is still in force, and every view says where it comes from.
    beat.stop()
    stack.start_beat()
    status = run_cli(settings, "status", "--ping-timeout", "0.2")
    assert status.returncode == 0, status.stderr
    flush_line = next(line for line in status.stdout.splitlines() if line.startswith("Flush"))
    assert "every 5s (run-time override set " in flush_line, flush_line
    assert "ROUTER_FLUSH_INTERVAL_S is 60s" in flush_line
    assert "hybrid-router config reset flush-interval" in flush_line
    assert "Beat      " in status.stdout and "polls every 2.5s" in status.stdout

    url = stack.start_api()
    stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
    assert stats["flush_interval_s"] == 5
    assert stats["flush_interval"]["source"] == "run-time override"
    assert stats["flush_interval"]["set_by"] == flush["set_by"]
    assert stats["beat"]["settings"]["poll_interval_s"] == 2.5
    assert stats["beat"]["last_tick_age_s"] < 30
    admin = httpx.get(f"{url}/v1/admin/config", timeout=10).json()
    assert admin["flush_interval"]["source"] == "run-time override"
    put = httpx.put(f"{url}/v1/admin/config", json={"flush_interval_s": 7}, timeout=10).json()
    assert put["flush_interval"]["set_by"].startswith("api tenant ")

    reset = run_cli(settings, "config", "reset", "flush-interval")
    assert reset.returncode == 0, reset.stderr
    assert json.loads(reset.stdout)["reset"] is True
    view = config_get(settings, **cli_env)
    assert view["flush_interval_s"] == 60 and view["flush_interval_overridden"] is False
    assert json.loads(run_cli(settings, "config", "reset", "flush-interval").stdout)["reset"] is False
    bad = run_cli(settings, "config", "reset", "poll-interval")
    assert bad.returncode == 2 and "unknown setting" in bad.stderr


@pytest.mark.timeout(120)
def test_beat_check_follows_the_age_of_the_last_tick(
    make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack]
) -> None:
    settings = make_settings()
    none = run_cli(settings, "beat", "--check")
    assert none.returncode == 1 and "no beat has ticked" in none.stderr

    beat = stack_factory(settings).start_beat()
    alive = run_cli(settings, "beat", "--check", "--max-age", "10")
    assert alive.returncode == 0, alive.stderr
    assert f"pid {beat.pid}" in alive.stdout

    beat.kill(signal.SIGKILL)  # dies without a word: the check must notice on its own
    wait_until(lambda: run_cli(settings, "beat", "--check", "--max-age", "2").returncode == 1,
               30, 0.5, message="beat --check to fail after beat died")
    stale = run_cli(settings, "beat", "--check", "--max-age", "2")
    assert "last tick was" in stale.stderr and "Traceback" not in stale.stderr
