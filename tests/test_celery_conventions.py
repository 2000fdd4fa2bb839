"""Celery's conventions hold for the router's app: importing builds nothing, ``celery -A
hybrid_router.workers.celery_app`` finds the app, and a bad setting stops every serving verb (the CLI's and
Celery's own) with one line naming the environment variable and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybrid_router.settings import Settings
from tests.support import celery_argv, child_env, cli_argv

BAD = {"ROUTER_FLUSH_INTERVAL_S": "-1"}


def run(argv: list[str], settings: Settings, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=child_env(settings, extra), capture_output=True, text=True,
                          timeout=90)


def test_importing_the_workers_builds_no_app_and_reads_no_settings(settings: Settings) -> None:
    code = (
        "import hybrid_router.workers.celery_app as app_module, hybrid_router.workers.stream.tasks, "
        "hybrid_router.workers.batch.tasks, "
        "hybrid_router.workers.stream.bootstep, hybrid_router.router.core.dispatch, hybrid_router.router.cli.main\n"
        "from hybrid_router.settings import get_settings\n"
        "assert '_app' not in vars(app_module), 'an app was built at import'\n"
        "assert get_settings.cache_info().currsize == 0, 'settings were read at import'\n"
        "print('clean')\n"
    )
    done = run([sys.executable, "-c", code], settings, BAD)  # a bad setting: nothing reads it
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"


@pytest.mark.parametrize("argv", [
    cli_argv("api"),
    cli_argv("worker", "--lane", "stream"),
    cli_argv("worker", "--lane", "batch"),
    cli_argv("beat"),
    cli_argv("flower"),
    cli_argv("up", "--no-logs"),
    celery_argv("worker", "-Q", "hr.stream"),
    celery_argv("beat"),
], ids=["api", "worker-stream", "worker-batch", "beat", "flower", "up", "celery-worker",
        "celery-beat"])
def test_a_bad_setting_stops_with_one_line_and_exit_code_2(argv: list[str],
                                                           settings: Settings) -> None:
    done = run(argv, settings, BAD)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and "ROUTER_FLUSH_INTERVAL_S" in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
