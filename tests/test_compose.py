"""docker-compose.yml, checked statically (no Docker engine runs here).

Each service's command must be a real CLI verb with real options, every ROUTER_* variable must
be a Settings field, beat must be a single replica and Redis must persist and never evict.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hybrid_router.router.cli.main import app
from hybrid_router.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ROUTER_SERVICES = ("api", "worker-stream", "worker-batch", "beat", "flower", "sim")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_every_service_exists(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"redis", *ROUTER_SERVICES}


@pytest.mark.parametrize("service", ROUTER_SERVICES)
def test_command_is_a_real_cli_verb_with_real_options(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    assert isinstance(command, list) and command, f"{service} needs a command list"
    # The image's ENTRYPOINT is `hybrid-router`; --help after the options still parses them,
    # so an unknown verb or option fails here (exit 2).
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, f"{service}: `hybrid-router {' '.join(command)}`: {result.output}"


def test_dockerfile_entrypoint_is_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["hybrid-router"]' in text
    assert "USER router" in text


def _router_env_names(compose: dict[str, Any]) -> set[str]:
    text = (ROOT / "docker-compose.yml").read_text()
    names = set(re.findall(r"\bROUTER_[A-Z0-9_]+", text))
    for service in compose["services"].values():
        env = service.get("environment") or {}
        names |= {n for n in (env if isinstance(env, dict) else [e.split("=")[0] for e in env])
                  if n.startswith("ROUTER_")}
    return names


def test_every_router_env_name_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"ROUTER_{name.upper()}" for name in Settings.model_fields}
    names = _router_env_names(compose)
    assert {"ROUTER_REDIS_URL", "ROUTER_UPSTREAM_API_KEY", "ROUTER_FLOWER_BASIC_AUTH"} <= names
    assert names - fields == set(), f"not Settings fields: {sorted(names - fields)}"


def test_router_services_share_the_same_settings(compose: dict[str, Any]) -> None:
    envs = {name: compose["services"][name]["environment"]
            for name in ("api", "worker-stream", "worker-batch", "beat", "flower")}
    first = envs["api"]
    for name, env in envs.items():
        assert env == first, f"{name} must see the same ROUTER_* settings as the api"
    assert first["ROUTER_REDIS_URL"].endswith("redis://redis:6379/0}")


def test_beat_is_exactly_one_replica(compose: dict[str, Any]) -> None:
    assert compose["services"]["beat"]["deploy"]["replicas"] == 1


def test_redis_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert compose["services"]["redis"]["volumes"]


def test_health_checks_and_sim_profile(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no health check"
    assert compose["services"]["sim"]["profiles"] == ["sim"]
    for name in ("api", "worker-stream", "worker-batch", "beat", "flower"):
        assert "profiles" not in compose["services"][name]
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_lane_workers_consume_their_own_lane(compose: dict[str, Any]) -> None:
    assert compose["services"]["worker-stream"]["command"][:3] == ["worker", "--lane", "stream"]
    assert compose["services"]["worker-batch"]["command"][:3] == ["worker", "--lane", "batch"]


# --- issue 20: minimum Compose version, beat liveness, Dockerfile layer order ---------------

# Compose features whose presence raises the minimum Docker Compose version, and where each is.
def _compose_features(compose: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    used: dict[str, tuple[int, int, int]] = {"compose spec without `version:` (v2)": (2, 0, 0)}
    for name, service in compose["services"].items():
        env_files = service.get("env_file") or []
        if any(isinstance(e, dict) and "required" in e for e in env_files):
            used[f"{name}: env_file required"] = (2, 24, 0)
        depends = service.get("depends_on") or {}
        if isinstance(depends, dict) and any("required" in d for d in depends.values()):
            used[f"{name}: depends_on required"] = (2, 20, 0)
        if "start_interval" in (service.get("healthcheck") or {}):
            used[f"{name}: healthcheck start_interval"] = (2, 20, 2)
        if "develop" in service:
            used[f"{name}: develop"] = (2, 22, 0)
    if "include" in compose:
        used["include"] = (2, 20, 0)
    return used


def _version(text: str) -> tuple[int, int, int]:
    match = re.search(r"Requires Docker Compose v(\d+)\.(\d+)\.(\d+) or later", text)
    assert match, "the minimum Docker Compose version is not stated"
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def test_minimum_compose_version_is_stated_and_covers_what_the_file_uses(
    compose: dict[str, Any]
) -> None:
    stated = _version((ROOT / "docker-compose.yml").read_text())
    assert _version((ROOT / "docs" / "OPERATIONS.md").read_text()) == stated
    assert "version" not in compose  # obsolete in Compose v2 (it warns), meaningless to v1
    needs = _compose_features(compose)
    too_new = {feature: v for feature, v in needs.items() if v > stated}
    assert not too_new, f"these need a newer Compose than the stated {stated}: {too_new}"
    assert max(needs.values()) == stated, "the stated minimum is higher than the file needs"


def test_beat_health_is_the_age_of_its_last_tick(compose: dict[str, Any]) -> None:
    test = compose["services"]["beat"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "hybrid-router"], test
    argv = test[2:]
    assert argv[:2] == ["beat", "--check"] and "--max-age" in argv
    result = CliRunner().invoke(app, [*argv, "--help"])  # a real verb with real options
    assert result.exit_code == 0, result.output
    assert "glob" not in " ".join(test)  # a schedule file outlives a dead beat


def test_dockerfile_installs_dependencies_before_copying_the_code(tmp_path: Path) -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]

    def index(predicate: Any) -> int:
        return next(i for i, line in enumerate(lines) if predicate(line))

    deps = index(lambda line: "pip install -r" in line)
    code = index(lambda line: re.match(r"COPY (settings|router|workers|simulator)\b", line))
    package = index(lambda line: line.startswith("RUN pip install --no-deps ."))
    copies_before_deps = [line for line in lines[:deps] if line.startswith("COPY")]
    assert copies_before_deps == ["COPY pyproject.toml ./"], copies_before_deps
    assert deps < code < package

    # The requirements the dependency layer installs are exactly pyproject's dependencies.
    import subprocess
    import sys
    import tomllib

    command = re.search(r'RUN python -c "(.+?)" > /tmp/requirements.txt', "\n".join(lines))
    assert command, "the dependency layer's requirement extraction was not found"
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    done = subprocess.run([sys.executable, "-c", command.group(1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.split() == expected
