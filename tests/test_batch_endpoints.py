"""Low-priority Responses and embeddings requests through the batch lane, natively (the upstream's
Batch API) and emulated (plain calls), end to end: ``POST /v1/requests`` with ``endpoint``, a
real batch worker and beat, the simulator over HTTP. One endpoint and one model per batch; each
result is written to its own record in its endpoint's shape, equal to what the simulator answers
the same body directly."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from hybrid_router.simulator.testing import running_simulator
from tests.support import Stack, wait_until, without_fields

KEY = "sk-batch-endpoints"
FAST = {"flush_interval_s": 0.5, "poll_interval_s": 0.3, "retry_backoff_base_s": 0.1,
        "retry_backoff_max_s": 0.5, "batch_lock_ttl_s": 2.0}
VOLATILE = frozenset({"id", "created_at"})


def stable(value: Any) -> Any:
    """`value` (JSON) without the fields every call makes anew."""
    return without_fields(value, VOLATILE)


@pytest.fixture(params=["native", "emulated"])
def upstream(request: pytest.FixtureRequest, sim_url: str) -> Iterator[tuple[str, str]]:
    """(batch mode, simulator URL): the shared simulator, or one without a Batch API."""
    if request.param == "native":
        yield "native", sim_url
        return
    with running_simulator(batch_api=False) as url:
        yield "emulated", url


def bodies(tag: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(3):
        out.append({"endpoint": "/v1/responses", "model": "gpt-4o-mini",
                    "input": f"batch responses {tag} {i}", "max_output_tokens": 9 + i})
        out.append({"endpoint": "/v1/embeddings", "model": "text-embedding-3-small",
                    "input": [f"batch embeddings {tag} {i} {j}" for j in range(5)]})
        out.append({"model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"batch chat {tag} {i}"}]})
    return out


def direct(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """The simulator's answer to the same body, called plainly."""
    endpoint = body.get("endpoint", "/v1/chat/completions")
    sent = {k: v for k, v in body.items() if k != "endpoint"}
    answer = httpx.post(url.removesuffix("/v1") + endpoint, json=sent,
                        headers={"Authorization": "Bearer sk-direct"}, timeout=30)
    answer.raise_for_status()
    data: dict[str, Any] = answer.json()
    return data


def test_responses_and_embeddings_complete_through_the_batch_lane(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis, upstream: tuple[str, str]) -> None:
    mode, url = upstream
    settings = make_settings(upstream_base_url=url, batch_mode=mode, api_keys={KEY: "t"},
                             **FAST)
    stack = stack_factory(settings)
    api = stack.start_api()
    headers = {"Authorization": f"Bearer {KEY}"}
    sent: dict[str, dict[str, Any]] = {}
    for body in bodies(f"{mode} {uuid.uuid4().hex}"):
        accepted = httpx.post(f"{api}/v1/requests", json={**body, "priority": "low"},
                              headers=headers, timeout=10)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["route"] == "batch"
        sent[accepted.json()["id"]] = body
    stack.start_worker("batch")
    stack.start_beat()

    def views() -> dict[str, dict[str, Any]] | None:
        out = {rid: httpx.get(f"{api}/v1/requests/{rid}", headers=headers, timeout=10).json()
               for rid in sent}
        return out if all(v["status"] in ("completed", "failed", "cancelled")
                          for v in out.values()) else None

    done = wait_until(views, 60, 0.2, message="every request terminal")
    batches: dict[str, set[str]] = {}
    for rid, view in done.items():
        body = sent[rid]
        endpoint = body.get("endpoint", "/v1/chat/completions")
        assert view["status"] == "completed", view["error"]
        assert view["endpoint"] == endpoint
        batches.setdefault(view["batch_id"], set()).add(endpoint)
        result = view["result"]
        expected = direct(url, body)
        if endpoint == "/v1/embeddings":
            assert result["response"] == expected
            tokens = expected["usage"]["prompt_tokens"]
            assert view["usage"]["prompt_tokens"] == tokens
            assert view["usage"]["completion_tokens"] == 0
            price = settings.price_for(body["model"]).input_per_mtok
            share = Decimal("0.5") if mode == "native" else Decimal(1)
            assert Decimal(view["cost_usd"]) == tokens * price * share / 1_000_000
        elif endpoint == "/v1/responses":
            assert stable(result["response"]) == stable(expected)
            assert result["content"] == expected["output"][0]["content"][0]["text"]
            by_id = httpx.get(f"{api}/v1/responses/{result['response']['id']}",
                              headers=headers, timeout=10)
            assert by_id.status_code == 200 and by_id.json() == result["response"]
        else:
            assert result["content"] == expected["choices"][0]["message"]["content"]
    # One endpoint (and model) per batch: three batches at least, none mixing endpoints.
    assert all(len(endpoints) == 1 for endpoints in batches.values())
    assert {next(iter(e)) for e in batches.values()} == {
        "/v1/responses", "/v1/embeddings", "/v1/chat/completions"}
    keys = Keys(settings.key_prefix)
    for batch_id, endpoints in batches.items():
        endpoint = next(iter(endpoints))
        if mode == "native":
            sdk = openai.OpenAI(base_url=url, api_key="sk-direct")
            assert sdk.batches.retrieve(batch_id).endpoint == endpoint
        else:
            assert batch_id.startswith("emu_")
        stored = redis_client.hget(keys.batch(batch_id), "endpoint")
        assert (stored.decode() if stored else "/v1/chat/completions") == endpoint
    assert not redis_client.llen(keys.pending("/v1/embeddings|text-embedding-3-small"))
