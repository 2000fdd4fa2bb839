"""Shared fixtures: a private Redis, per-test settings with their own key prefix, the upstream
simulator, and a `stack` factory that starts the router's real processes and stops them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings
from tests.support import Stack, delete_prefix, start_redis_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every smoke benchmark (`tests/test_bench_smoke*.py`) is `slow`: it measures, so it runs
    alone after the default run (`.ci/run`), and a new one lands there without a marker."""
    for item in items:
        if item.path.name.startswith("test_bench_smoke"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the whole run, so no data of anybody else is touched."""
    proc, url = start_redis_server(Path(tmp_path_factory.mktemp("redis")))
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """One shared OpenAI-compatible simulator (per-request faults via prompt directives)."""
    from hybrid_router.simulator.testing import running_simulator

    with running_simulator(ttft_s=0.0, tokens_per_s=0.0, batch_turnaround_s=0.5) as url:
        yield url


@pytest.fixture
def make_settings(redis_base_url: str) -> Iterator[Callable[..., Settings]]:
    """Factory of `Settings` with a private key prefix; the prefix's keys are removed after."""
    prefixes: list[str] = []

    def factory(**overrides: Any) -> Settings:
        prefix = overrides.pop("key_prefix", None) or f"t{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        values: dict[str, Any] = {
            "redis_url": f"{redis_base_url}/0",
            "key_prefix": prefix,
            "upstream_api_key": "sk-test-simulator",
            "log_format": "json",
        }
        values.update(overrides)
        return Settings(**values)

    yield factory
    for prefix in prefixes:
        delete_prefix(f"{redis_base_url}/0", prefix)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], sim_url: str) -> Settings:
    return make_settings(upstream_base_url=sim_url)


@pytest.fixture
def redis_client(redis_base_url: str) -> Iterator[redis.Redis]:
    client = sync_client(f"{redis_base_url}/0")
    yield client
    client.close()


@pytest.fixture
def stack_factory() -> Iterator[Callable[[Settings], Stack]]:
    """Start the router's processes for given settings; all are stopped after the test."""
    stacks: list[Stack] = []

    def factory(settings: Settings) -> Stack:
        stack = Stack(settings)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()
