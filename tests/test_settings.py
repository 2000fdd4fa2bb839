"""Settings: env prefix, .env, clear validation errors (also through the CLI), and the README's
configuration table listing every field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from hybrid_router.settings import Settings, settings_to_env
from hybrid_router.settings.config import describe_settings_error
from tests.support import REPO_ROOT, child_env


def make(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("values", "field", "word"),
    [
        ({"flush_interval_s": -1}, "flush_interval_s", "greater than or equal to 0.1"),
        ({"flush_interval_s": 1e-300}, "flush_interval_s", "greater than or equal to 0.1"),
        ({"callback_allowed_hosts": ["localhost:99999"]}, "callback_allowed_hosts", "1-65535"),
        ({"callback_allowed_hosts": ["localhost:abc"]}, "callback_allowed_hosts", "1-65535"),
        ({"public_base_url": "router.example.com"}, "public_base_url", "http"),
        ({"batch_mode": "sometimes"}, "batch_mode", "native"),
        ({"redis_url": "http://localhost:6379/0"}, "redis_url", "Redis URL"),
        ({"redis_url": "redis://localhost:notaport/0"}, "redis_url", "port"),
        ({"redis_url": "redis://localhost:6379/zero"}, "redis_url", "database"),
        ({"redis_url": "redis:///0"}, "redis_url", "host"),
        ({"normal_route": "teleport"}, "normal_route", "stream"),
        ({"key_prefix": "has space"}, "key_prefix", "pattern"),
        ({"upstream_base_url": "ftp://x"}, "upstream_base_url", "http"),
    ],
)
def test_bad_settings_name_the_field(values: dict[str, Any], field: str, word: str) -> None:
    with pytest.raises(ValidationError) as exc:
        make(**values)
    line = describe_settings_error(exc.value)
    assert field in line and f"ROUTER_{field.upper()}" in line
    assert word.lower() in line.lower()
    assert "\n" not in line


def test_env_prefix_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROUTER_FLUSH_INTERVAL_S", "5")
    monkeypatch.setenv("ROUTER_API_KEYS", '{"k1": "acme"}')
    monkeypatch.setenv("FLUSH_INTERVAL_S", "99")  # no prefix: ignored
    dotenv = tmp_path / ".env"
    dotenv.write_text("ROUTER_BATCH_MODE=emulated\nROUTER_FLUSH_INTERVAL_S=7\n")
    settings = Settings(_env_file=str(dotenv))
    assert settings.flush_interval_s == 5  # the environment wins over .env
    assert settings.batch_mode == "emulated"
    assert settings.api_keys == {"k1": "acme"} and settings.auth_enabled


def test_settings_to_env_reproduces_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    original = make(key_prefix="abc", api_keys={"k": "t"}, allowed_models=["m1"],
                    upstream_api_key="sk-secret-123456", flush_interval_s=2.5)
    for name, value in settings_to_env(original).items():
        monkeypatch.setenv(name, value)
    copy = make()
    assert copy.model_dump() == original.model_dump()
    assert "sk-secret" not in str(original.safe_dump())


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hybrid_router.router.cli.main", *args], env=env, cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("ROUTER_FLUSH_INTERVAL_S", "-3", "flush_interval_s"),
        ("ROUTER_BATCH_MODE", "bogus", "batch_mode"),
        ("ROUTER_REDIS_URL", "mysql://db", "redis_url"),
        ("ROUTER_PRICES", "{bad", "ROUTER_PRICES"),
    ],
)
def test_cli_refuses_bad_settings_with_one_line(name: str, value: str, field: str) -> None:
    env = child_env(make())
    env[name] = value
    done = run_cli("api", "--port", "1", env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert field in lines[0] and lines[0].startswith("hybrid-router: invalid configuration")


@pytest.mark.parametrize(
    ("name", "value"),
    [("ROUTER_PRICES", "{bad"), ("ROUTER_API_KEYS", "not json"), ("ROUTER_ALLOWED_MODELS", "[x")],
)
def test_bad_json_setting_names_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """pydantic-settings says 'field "prices" from source "EnvSettingsSource"'; the user has to
    fix ROUTER_PRICES, so the one line names it (and says the value is not JSON)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(Exception) as exc:
        Settings()
    line = describe_settings_error(exc.value)
    assert name in line and "not valid JSON" in line, line
    assert "EnvSettingsSource" not in line and "\n" not in line


# Meanings of the fields that carry no `description` in Settings (the README table shows them).
MEANINGS = {
    "key_prefix": "Prefix of every Redis key, channel and Celery queue.",
    "upstream_timeout_s": "Timeout of one upstream HTTP call.",
    "normal_route": "Where `normal` priority goes: `stream` or `batch`.",
    "batch_mode": "`native` Batch API, `emulated` (concurrent plain calls) or `auto` (probe).",
    "batch_max_requests": "Most requests in one upstream batch.",
    "batch_max_bytes": "Largest batch input file.",
    "batch_completion_window": "Completion window asked of the Batch API.",
    "emulated_concurrency": "Concurrent upstream calls of an emulated batch.",
    "stream_max_retries": "Retries of a failed stream before the request fails.",
    "retry_backoff_base_s": "First retry pause (exponential, with jitter).",
    "retry_backoff_max_s": "Longest retry pause.",
    "result_ttl_s": "How long a finished record is kept.",
    "replay_ttl_s": "How long a request's replay log is kept.",
    "replay_maxlen": "Most events kept in one replay log.",
    "prices": "JSON: model -> {input_per_mtok, output_per_mtok} USD; `*` is the fallback.",
    "batch_discount": "Batch discount off the standard price (0.5 = half price).",
    "api_host": "Interface the intake API listens on.",
    "api_port": "Port the intake API listens on.",
    "max_body_bytes": "Largest request body accepted (413 above).",
    "allowed_models": "JSON list of models accepted; empty = any.",
    "default_model": "Model used when a request names none.",
    "callback_secret": "HMAC secret signing terminal callbacks.",
    "callback_max_attempts": "Delivery attempts of a terminal callback.",
    "log_level": "DEBUG, INFO, WARNING or ERROR.",
    "log_format": "`json`, `console` or `auto` (console in a terminal, else JSON).",
}
SECRET_FIELDS = {"upstream_api_key", "callback_secret", "flower_basic_auth"}


def render_settings_table() -> str:
    """The README's configuration table, generated from `Settings.model_fields`."""
    rows = ["| env | meaning | default |", "| --- | --- | --- |"]
    defaults = Settings.model_construct().model_dump(mode="json")
    for name, info in Settings.model_fields.items():
        meaning = info.description or MEANINGS.get(name, "")
        if name in SECRET_FIELDS or name == "prices":
            default = "—" if name != "prices" else "built-in table"
        else:
            value = defaults.get(name)
            default = "—" if value is None else f"`{orjson.dumps(value).decode().strip(chr(34))}`"
        rows.append(f"| `ROUTER_{name.upper()}` | {meaning.replace('|', '/')} | {default} |")
    return "\n".join(rows)


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def write_readme_table() -> None:
    """Regenerate the table in place: ``python -m tests.test_settings``."""
    path = REPO_ROOT / "README.md"
    text = path.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    path.write_text(f"{head}{TABLE_START}\n{render_settings_table()}\n{TABLE_END}{tail}")


def readme_settings() -> set[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return set(re.findall(r"^\|\s*`(ROUTER_[A-Z0-9_]+)`", text, flags=re.M))


def test_readme_configuration_table_lists_every_setting() -> None:
    documented = readme_settings()
    fields = {f"ROUTER_{name.upper()}" for name in Settings.model_fields}
    assert not fields - documented, (
        f"README misses: {sorted(fields - documented)}; regenerate with python -m tests.test_settings"
    )
    assert not documented - fields, f"README documents unknown: {sorted(documented - fields)}"


if __name__ == "__main__":
    write_readme_table()
