"""The simulator's service tiers, through the official openai SDK: the served tier echoed, flex
slower and priority faster by their factors (read from the simulator's own header, not timed),
flex answered 429 resource-unavailable above a concurrency or with a probability, 400 for the
models without flex, and the per-request directives that force each case."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import running_simulator, sim_stats
from tests.support import wait_until

MODEL = "gpt-5-mini"


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with running_simulator(ttft_s=0.02, tokens_per_s=0.0, flex_slowdown=4.0,
                           priority_speedup=2.0, flex_max_concurrency=1,
                           no_flex_models=["no-flex-model"]) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(sim: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim, api_key="sk-test", max_retries=0)


def msgs(directive: str = "") -> Any:
    return [{"role": "user", "content": f"Sim tiers {uuid.uuid4().hex} {directive}"}]


@pytest.mark.parametrize("asked,served,ttft", [
    (None, "default", 0.02), ("auto", "default", 0.02), ("default", "default", 0.02),
    ("flex", "flex", 0.08), ("priority", "priority", 0.01),
])
def test_served_tier_is_echoed_and_timed_by_its_factor(
        sdk: openai.OpenAI, asked: str | None, served: str, ttft: float) -> None:
    extra = {} if asked is None else {"service_tier": asked}
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=msgs(),
                                                        extra_body=extra)
    assert raw.parse().service_tier == served
    assert float(raw.headers["x-sim-ttft-s"]) == pytest.approx(ttft)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=msgs(), stream=True,
                                              extra_body=extra))
    assert {c.service_tier for c in chunks} == {served}


def test_models_without_flex_answer_400(sdk: openai.OpenAI, sim: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="no-flex-model", messages=msgs(), service_tier="flex")
    assert err.value.body["param"] == "service_tier"  # type: ignore[index]
    assert sdk.chat.completions.create(model="no-flex-model",
                                       messages=msgs()).service_tier == "default"
    m = msgs("[[sim:flex_400]]")
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=MODEL, messages=m, service_tier="flex")
    assert sim_stats(sim, prompt_hash(m))["flex_refused_400"] == 1


def test_directives_force_429_then_serve_and_force_the_served_tier(
        sdk: openai.OpenAI, sim: str) -> None:
    m = msgs("[[sim:flex_429=2]]")
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as err:
            sdk.chat.completions.create(model=MODEL, messages=m, service_tier="flex")
        assert err.value.code == "resource_unavailable"
    assert sdk.chat.completions.create(model=MODEL, messages=m,
                                       service_tier="flex").service_tier == "flex"
    # flex_429 only hits flex calls; tier= overrides what is served (and echoed).
    assert sdk.chat.completions.create(model=MODEL, messages=m).service_tier == "default"
    forced = sdk.chat.completions.create(model=MODEL, messages=msgs("[[sim:tier=default]]"),
                                         service_tier="flex")
    assert forced.service_tier == "default"


def test_flex_above_the_concurrency_answers_429(sdk: openai.OpenAI, sim: str) -> None:
    slow = msgs("[[sim:ttft=0.5,tokens=5]]")  # flex: 2 s to the first token
    done = threading.Event()

    def hold() -> None:
        try:
            sdk.chat.completions.create(model=MODEL, messages=slow, service_tier="flex")
        finally:
            done.set()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        wait_until(lambda: sim_stats(sim)["flex_in_flight"] == 1, 10, 0.02,
                   message="one flex call in flight")
        with pytest.raises(openai.RateLimitError) as err:
            sdk.chat.completions.create(model=MODEL, messages=msgs(), service_tier="flex")
        assert err.value.code == "resource_unavailable"
        assert sdk.chat.completions.create(model=MODEL, messages=msgs(),
                                           service_tier="priority").service_tier == "priority"
    finally:
        thread.join(timeout=10)
    assert done.is_set() and sim_stats(sim)["flex_in_flight"] == 0


def test_flex_429_with_a_probability() -> None:
    with running_simulator(flex_rate_429=1.0) as url:
        sdk = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model=MODEL, messages=msgs(), service_tier="flex")
        assert sdk.chat.completions.create(model=MODEL, messages=msgs()).service_tier == "default"
