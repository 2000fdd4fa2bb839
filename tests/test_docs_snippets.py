"""Every ```python block of README.md, docs/ and simulator/README.md runs (issue 20).

Each block is executed as written, in a fresh namespace, against a real deployment started for
this module (API and a stream worker on a private prefix, the shared simulator upstream):

- the router's URL in a snippet (``http://127.0.0.1:8000``, the quickstart's address) is
  replaced by the test API's URL, the only change made to a snippet's text;
- the API keys the snippets show (``"..."``, ``"your-router-key"``) are the deployment's keys;
- ``get_settings()`` reads the deployment's ``ROUTER_*`` environment, as in a web app that
  shares the router's settings.

A block that cannot run here starts with ``# docs-test: skip <reason>``; the test skips it with
that reason (and fails a marker without one). Today every block runs.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hybrid_router.settings import Settings, get_settings, settings_to_env
from tests.support import REPO_ROOT, Stack, delete_prefix

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md"),
               REPO_ROOT / "simulator" / "README.md"])
SKIP_MARKER = "# docs-test: skip"
ROUTER_URL = "http://127.0.0.1:8000"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def snippets() -> list[Snippet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # first line of code
            found.append(Snippet(path, line, match.group(1)))
    return found


def test_the_docs_have_python_snippets() -> None:
    """The extraction itself works (a broken regex would make every other test vanish)."""
    ids = [s.id for s in snippets()]
    assert "README.md" in " ".join(ids) and any(i.startswith("docs/") for i in ids), ids


@pytest.fixture(scope="module")
def deployment(redis_base_url: str, sim_url: str) -> Iterator[tuple[Settings, str]]:
    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
                        api_keys={"...": "docs", "your-router-key": "docs"}, log_format="json")
    stack = Stack(settings)
    try:
        url = stack.start_api()
        stack.start_worker("stream", concurrency=4)
        yield settings, url
    finally:
        stack.stop()
        delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("snippet", snippets(), ids=lambda s: s.id)
def test_snippet_runs(snippet: Snippet, request: pytest.FixtureRequest,
                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    first = snippet.code.lstrip().splitlines()[0] if snippet.code.strip() else ""
    if first.startswith(SKIP_MARKER):
        reason = first.removeprefix(SKIP_MARKER).strip(" :-")
        assert reason, f"{snippet.id}: '{SKIP_MARKER}' needs a reason"
        pytest.skip(f"{snippet.id}: {reason}")
    code = snippet.code
    if "router" in code or "settings" in code:  # it talks to a deployment: give it ours
        settings, url = request.getfixturevalue("deployment")
        code = code.replace(ROUTER_URL, url)
        for name in [n for n in os.environ if n.startswith("ROUTER_")]:
            monkeypatch.delenv(name)
        for name, value in settings_to_env(settings).items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        request.addfinalizer(get_settings.cache_clear)
    exec(compile(code, snippet.id, "exec"), {"__name__": "__docs__"})
    capsys.readouterr()  # what the snippet printed is not checked, only that it ran
