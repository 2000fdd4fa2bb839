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

from router.cli import app
from settings import Settings

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
