"""Property-based fuzzing of the API against its own OpenAPI document (schemathesis).

Every operation in ``/openapi.json`` of a real API subprocess gets schema-derived valid and
invalid requests; the one check is ``not_a_server_error``: whatever a client sends, the API
answers a 4xx (or success), never a 5xx. Bounded (examples per operation and a time budget)
so it fits the CI short run; the seed makes a failure reproducible.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hybrid_router.settings import Settings
from tests.support import Stack, delete_prefix

API_KEY = "sk-fuzz"
SEED = 20261123


def schemathesis_cli() -> list[str]:
    st = Path(sys.executable).with_name("st")
    if st.exists():
        return [str(st)]
    found = shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return [found]


@pytest.mark.slow  # ~45 s of fuzzing: run by .ci/run after the default run (-m slow)
def test_no_server_errors_under_schema_fuzzing(redis_base_url: str, sim_url: str,
                                              tmp_path: Path) -> None:
    """With a stream worker and the simulator behind it, so valid chat calls finish."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(
        redis_url=f"{redis_base_url}/0",
        key_prefix=prefix,
        upstream_base_url=sim_url,
        upstream_api_key="sk-sim",
        stream_max_retries=0,
        api_keys={API_KEY: "admin"},  # an admin tenant: /v1/admin/* is fuzzed too
        sse_keepalive_s=1.0,
        log_format="json",
    )
    stack = Stack(settings, workdir=tmp_path)
    try:
        url = stack.start_api()
        stack.start_worker("stream", concurrency=8)
        argv = [
            *schemathesis_cli(), "run", f"{url}/openapi.json",
            "--checks", "not_a_server_error",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "25",
            "--max-time", "40",
            "--seed", str(SEED),
            "--request-timeout", "5",
            # One worker: hypothesis' lambda descriptions call ast.parse, which is not
            # thread-safe on CPython 3.11 ("AST constructor recursion depth mismatch").
            "--workers", "1",
            "--header", f"Authorization: Bearer {API_KEY}",
            "--suppress-health-check", "all",
            "--no-color",
            # /events of a request that exists is an endless SSE stream by design.
            "--exclude-path-regex", r".*/events$",
        ]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        report = run.stdout[-6000:] + run.stderr[-2000:]
        api_log = stack.logs()
        assert run.returncode == 0, f"schemathesis found problems:\n{report}\n{api_log[-4000:]}"
        assert "unhandled error" not in api_log, api_log[-4000:]
    finally:
        stack.stop()
        delete_prefix(settings.redis_url, prefix)
