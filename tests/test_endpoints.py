"""`hybrid_router.router.core.endpoints` and the intake's endpoint checks, as plain functions: batch queue names,
usage and results of each endpoint's answer, body checks, budgets in the endpoint's own field."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import redis
from pydantic import ValidationError

from hybrid_router.router.client import enqueue
from hybrid_router.router.core.endpoints import (
    CHAT,
    EMBEDDINGS,
    RESPONSES,
    batch_queue,
    normal_usage,
    result_from_body,
    split_queue,
)
from hybrid_router.router.core.intake import prepare
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.pricing import estimate_body_prompt_tokens
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES, EMBEDDINGS])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "ft:gpt-4o-mini:org::x1", "a|b"])
def test_a_batch_queue_name_gives_back_its_endpoint_and_model(endpoint: str, model: str) -> None:
    name = batch_queue(endpoint, model)
    assert split_queue(name) == (endpoint, model)
    assert (name == model) == (endpoint == CHAT)  # chat queues keep their old names


def test_each_endpoints_usage_is_priced_as_prompt_and_completion_tokens() -> None:
    assert normal_usage({"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}) == {
        "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert normal_usage({"prompt_tokens": 5, "total_tokens": 5}) == {
        "prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    assert normal_usage(None) is None


def test_results_keep_the_endpoints_own_answer() -> None:
    response = {"object": "response", "status": "incomplete", "usage": {
        "input_tokens": 4, "output_tokens": 2},
        "output": [{"type": "function_call", "name": "f"},
                   {"type": "message", "content": [{"type": "output_text", "text": "Hel"},
                                                   {"type": "refusal", "refusal": "x"},
                                                   {"type": "output_text", "text": "lo"}]}]}
    result, usage = result_from_body(response)
    assert result == {"content": "Hello", "finish_reason": "incomplete", "usage": usage,
                      "response": response}
    assert usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    vectors = {"object": "list", "data": [{"embedding": [0.5]}],
               "usage": {"prompt_tokens": 9, "total_tokens": 9}}
    result, usage = result_from_body(vectors)
    assert result["response"] == vectors and result["content"] == ""
    assert usage == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    chat = {"object": "chat.completion", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            "choices": [{"message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop"}]}
    result, _ = result_from_body(chat)
    assert result["content"] == "hi" and "response" not in result


@pytest.mark.parametrize(("body", "problem"), [
    ({"messages": [{"role": "user", "content": "x"}]}, None),
    ({}, "messages: required"),
    ({"endpoint": RESPONSES, "input": "x"}, None),
    ({"endpoint": RESPONSES, "input": [{"role": "user", "content": "x"}]}, None),
    ({"endpoint": RESPONSES, "input": ["x"]}, "input: a string or a list of input items"),
    ({"endpoint": RESPONSES, "messages": [{"role": "user", "content": "x"}]},
     "messages: not a field"),
    ({"endpoint": EMBEDDINGS, "input": [[1, 2], [3]]}, None),
    ({"endpoint": EMBEDDINGS, "input": [1, 2, 3]}, None),
    ({"endpoint": EMBEDDINGS, "input": ["a", 1]}, "input: a string, a list of"),
    ({"endpoint": EMBEDDINGS, "input": ["a"] * 2049}, "at most 2048"),
    ({"endpoint": EMBEDDINGS, "input": "a", "stream": True}, "stream: embeddings"),
    ({"endpoint": EMBEDDINGS}, "input: required"),
])
def test_a_body_must_fit_its_endpoint(body: dict[str, Any], problem: str | None) -> None:
    if problem is None:
        SubmitRequest.model_validate(body)
        return
    with pytest.raises(ValidationError, match=problem):
        SubmitRequest.model_validate(body)


def test_prompt_estimates_read_input_too() -> None:
    assert estimate_body_prompt_tokens({"input": "x" * 400}) > 100
    assert estimate_body_prompt_tokens({"input": [[1] * 50, [2] * 50]}) == 100
    assert estimate_body_prompt_tokens({"input": [1] * 30}) == 30
    assert estimate_body_prompt_tokens({"input": [{"role": "user", "content": "y" * 400}]}) > 100


def test_a_budget_caps_each_endpoints_own_output_field(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    budget = Decimal("0.0001")
    responses = prepare(SubmitRequest.model_validate(
        {"endpoint": RESPONSES, "input": "hi", "max_cost_usd": budget, "priority": "high"}),
        "t", settings).record
    assert 0 < responses.body["max_output_tokens"] < 1_000_000
    assert "max_tokens" not in responses.body
    assert responses.endpoint == RESPONSES and responses.batch_queue == f"{RESPONSES}|gpt-4o-mini"
    embeddings = prepare(SubmitRequest.model_validate(
        {"endpoint": EMBEDDINGS, "model": "text-embedding-3-small", "input": ["a", "b"],
         "max_cost_usd": budget}), "t", settings).record
    assert set(embeddings.body) == {"model", "input"}
    assert embeddings.to_hash()["endpoint"] == EMBEDDINGS
    chat = prepare(SubmitRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}]}), "t", settings).record
    assert "endpoint" not in chat.to_hash()


def test_the_python_client_enqueues_a_body_of_another_endpoint(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    settings = make_settings()
    request_id = enqueue(settings, None, endpoint=EMBEDDINGS, model="text-embedding-3-small",
                         input=["a", "b"])
    record = RequestStore(redis_client, settings).get(request_id)
    assert record is not None and record.endpoint == EMBEDDINGS and record.route == "batch"
    assert record.body == {"model": "text-embedding-3-small", "input": ["a", "b"]}
    queue = Keys(settings.key_prefix).pending(f"{EMBEDDINGS}|text-embedding-3-small")
    assert redis_client.lrange(queue, 0, -1) == [request_id.encode()]
