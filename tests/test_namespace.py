"""The package lives in one import namespace, `hybrid_router.*` (issue 17).

A web app's own ``settings.py``, ``router.py`` or ``workers.py`` (common in Flask and Django
projects) must neither be imported by the router in place of its own modules, nor be hidden
by them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_router.settings import Settings, settings_to_env
from tests.support import REPO_ROOT, Stack, delete_prefix

OLD_TOP_LEVEL = {"router", "workers", "settings", "simulator"}
SOURCE_DIRS = ["router", "workers", "settings", "simulator", "tests", "bench"]


def _python_files() -> Iterator[Path]:
    for folder in SOURCE_DIRS:
        yield from (REPO_ROOT / folder).rglob("*.py")


def test_no_module_imports_a_bare_top_level_name() -> None:
    """Every import of our own code goes through `hybrid_router.`; a bare ``import router``
    would pick up an application's module of that name."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} {name}"
                          for name in names if name.split(".")[0] in OLD_TOP_LEVEL]
    assert offenders == []


def _readme_client_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Python client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's 'Python client' section has no python block"
    return match.group(1)


@pytest.fixture(scope="module")
def deployment(redis_base_url: str, sim_url: str) -> Iterator[tuple[Settings, str]]:
    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
                        api_keys={"...": "docs"}, log_format="json")
    stack = Stack(settings)
    try:
        url = stack.start_api()
        stack.start_worker("stream", concurrency=2)
        yield settings, url
    finally:
        stack.stop()
        delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.mark.timeout(120)
def test_the_readme_client_runs_in_an_app_with_its_own_settings_router_and_workers(
        deployment: tuple[Settings, str], tmp_path: Path) -> None:
    settings, url = deployment
    for name in ("settings", "router", "workers", "simulator"):
        (tmp_path / f"{name}.py").write_text(
            f'"""The web app\'s own {name} module."""\nOWNER = "the app"\n')
    app = tmp_path / "app.py"
    snippet = _readme_client_snippet().replace("http://127.0.0.1:8000", url)
    app.write_text(snippet + textwrap.dedent("""
        import settings as app_settings, router as app_router, workers as app_workers
        for module in (app_settings, app_router, app_workers):
            assert module.OWNER == "the app", module.__file__
        import redis
        from hybrid_router.router.core.keys import Keys
        stored = redis.Redis.from_url(get_settings().redis_url).exists(
            Keys(get_settings().key_prefix).record(request_id))
        assert stored, "enqueue did not store the request"
        print("OK", handle.id, request_id)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    env.pop("PYTHONPATH", None)
    env.update(settings_to_env(settings))
    done = subprocess.run([sys.executable, str(app)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("OK ")
