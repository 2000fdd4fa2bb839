"""``POST /v1/responses``, ``GET /v1/responses/{id}`` and ``POST /v1/embeddings`` through a real
API and stream worker and the simulator: the official openai SDK pointed at the router gets
what the same calls get from the simulator directly (ids and timestamps aside: each call makes
new ones), and a Responses stream can be followed again, resumed and after compaction, from the
request's replay log."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.replay import compact_one
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_stats
from tests.support import Stack, wait_until, without_fields

MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
KEY = "sk-router-responses"
OTHER_KEY = "sk-router-other"
# Fields whose values are new on every call (random ids, the clock).
VOLATILE = frozenset({"id", "item_id", "created_at"})
TOOLS: Any = [{"type": "function", "name": "lookup", "description": "Look something up.",
               "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def lane(redis_base_url: str, sim_url: str) -> Iterator[Stack]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
        api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"}, retry_backoff_base_s=0.02,
        retry_backoff_max_s=0.1, stream_worker_concurrency=8, log_format="json",
    )
    with Stack(settings) as stack:
        stack.start_api(timeout=60)
        stack.start_worker("stream", timeout=60)
        yield stack


@pytest.fixture(scope="module")
def router_sdk(lane: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lane.api_url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def direct_sdk(sim_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim_url, api_key="sk-direct", max_retries=0)


def prompt(directive: str = "") -> str:
    return f"Responses {uuid.uuid4().hex} {directive}"


def stable(value: Any) -> Any:
    """`value` (JSON) without the fields every call makes anew."""
    return without_fields(value, VOLATILE)


def dumped(events: Any) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in events]


def test_streamed_response_is_the_upstreams_event_stream(router_sdk: openai.OpenAI,
                                                         direct_sdk: openai.OpenAI) -> None:
    text = prompt("[[sim:tokens=25]]")
    via_router = dumped(router_sdk.responses.create(model=MODEL, input=text, stream=True,
                                                    extra_headers={"X-Priority": "high"}))
    direct = dumped(direct_sdk.responses.create(model=MODEL, input=text, stream=True))
    assert [e["type"] for e in via_router] == [e["type"] for e in direct]
    assert [e["sequence_number"] for e in via_router] == list(range(len(direct)))
    assert stable(via_router) == stable(direct)
    deltas = [e for e in via_router if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 25
    final = via_router[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["output"][0]["content"][0]["text"] == "".join(
        e["delta"] for e in deltas)
    assert final["response"]["usage"]["output_tokens"] == 25


def test_response_object_and_get_by_id(router_sdk: openai.OpenAI, direct_sdk: openai.OpenAI,
                                       lane: Stack) -> None:
    text = prompt()
    made = router_sdk.responses.create(model=MODEL, input=text, instructions="Be brief.",
                                       max_output_tokens=7, metadata={"k": "v"})
    direct = direct_sdk.responses.create(model=MODEL, input=text, instructions="Be brief.",
                                         max_output_tokens=7, metadata={"k": "v"})
    assert made.id.startswith("resp_")
    assert stable(made.model_dump(mode="json")) == stable(direct.model_dump(mode="json"))
    assert made.status == "incomplete" and made.usage is not None
    assert made.usage.output_tokens == 7
    again = router_sdk.responses.retrieve(made.id)
    assert again.model_dump(mode="json") == made.model_dump(mode="json")
    other = openai.OpenAI(base_url=f"{lane.api_url}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        router_sdk.responses.retrieve("resp_" + "0" * 48)


def test_tool_call_events_are_relayed_in_order(router_sdk: openai.OpenAI,
                                               direct_sdk: openai.OpenAI) -> None:
    text = prompt("[[sim:tool_calls=2]]")
    via_router = dumped(router_sdk.responses.create(model=MODEL, input=text, tools=TOOLS,
                                                    stream=True))
    direct = dumped(direct_sdk.responses.create(model=MODEL, input=text, tools=TOOLS,
                                                stream=True))
    assert stable(via_router) == stable(direct)
    kinds = [e["type"] for e in via_router]
    assert kinds.count("response.function_call_arguments.delta") > 2
    calls = [i for i in via_router[-1]["response"]["output"] if i["type"] == "function_call"]
    assert [c["name"] for c in calls] == ["lookup", "lookup"]
    assert all(json.loads(c["arguments"]) for c in calls)


def test_a_retried_upstream_error_is_not_seen(router_sdk: openai.OpenAI, sim_url: str) -> None:
    text = prompt("[[sim:fail=429,times=1,retry_after=0]]")
    events = dumped(router_sdk.responses.create(model=MODEL, input=text, stream=True))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    stats = sim_stats(sim_url, prompt_hash([{"role": "user", "content": text}]))
    assert stats["errors_injected"] == 1 and stats["streams_completed"] == 1


def test_a_stream_cut_after_events_fails_as_an_api_error(router_sdk: openai.OpenAI) -> None:
    text = prompt("[[sim:drop_after=3,tokens=20]]")
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for event in router_sdk.responses.create(model=MODEL, input=text, stream=True):
            seen.append(event.type)
    assert seen.count("response.output_text.delta") == 3
    assert "cannot be resumed" in str(caught.value)


def sse_events(lane: Stack, request_id: str, after: int) -> list[dict[str, Any]]:
    """The request's events after seq `after` from ``GET /v1/requests/{id}/events``."""
    return sse_events_at(lane.api_url, request_id, after)


def test_a_responses_stream_is_resumable_from_the_replay_log(lane: Stack,
                                                             router_sdk: openai.OpenAI) -> None:
    text = prompt("[[sim:tokens=12]]")
    with router_sdk.responses.with_streaming_response.create(
            model=MODEL, input=text, stream=True) as raw:
        request_id = raw.headers["x-request-id"]
        relayed = [json.loads(line[6:]) for line in raw.iter_lines() if line.startswith("data: ")]
    logged = sse_events(lane, request_id, 0)
    upstream = [e["event"] for e in logged if e["type"] == "response"]
    assert upstream == relayed
    assert logged[-1]["type"] == "done"
    cut = logged[5]["seq"]
    assert sse_events(lane, request_id, cut) == [e for e in logged if e["seq"] > cut]
    client = redis.Redis.from_url(lane.settings.redis_url)
    try:
        assert compact_one(client, lane.settings, request_id) == 1
    finally:
        client.close()
    assert sse_events(lane, request_id, cut) == [e for e in logged if e["seq"] > cut]
    # The compact record keeps what a follower needs (not `accepted` / `started`).
    assert sse_events(lane, request_id, 0) == [e for e in logged
                                               if e["type"] in ("response", "done")]


@pytest.mark.parametrize("encoding", [None, "float"])
def test_embeddings_are_the_upstreams(router_sdk: openai.OpenAI, direct_sdk: openai.OpenAI,
                                      encoding: str | None) -> None:
    inputs = [f"embed {uuid.uuid4().hex} {i}" for i in range(40)]
    extra: Any = {"encoding_format": encoding} if encoding else {}
    via_router = router_sdk.embeddings.create(model=EMBEDDING_MODEL, input=inputs, **extra)
    direct = direct_sdk.embeddings.create(model=EMBEDDING_MODEL, input=inputs, **extra)
    assert via_router.model_dump(mode="json") == direct.model_dump(mode="json")
    assert len(via_router.data) == 40 and len(via_router.data[0].embedding) == 256
    small = router_sdk.embeddings.create(model=EMBEDDING_MODEL, input=inputs[0], dimensions=8)
    assert len(small.data[0].embedding) == 8


def test_embeddings_cost_counts_input_tokens(lane: Stack) -> None:
    body = {"model": EMBEDDING_MODEL, "input": ["one two three", "four five"],
            "encoding_format": "float"}
    answer = httpx.post(f"{lane.api_url}/v1/embeddings", json=body,
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    record = httpx.get(f"{lane.api_url}/v1/requests/{request_id}",
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert record["endpoint"] == "/v1/embeddings" and record["route"] == "stream"
    tokens = answer.json()["usage"]["prompt_tokens"]
    assert record["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0,
                               "total_tokens": tokens}
    price = lane.settings.price_for(EMBEDDING_MODEL).input_per_mtok
    assert float(record["cost_usd"]) == pytest.approx(tokens * float(price) / 1e6)
    assert record["result"]["response"] == answer.json()


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings"])
def test_low_priority_is_refused_on_the_drop_ins(lane: Stack, path: str) -> None:
    body = {"model": MODEL, "input": "hello", "priority": "low"}
    answer = httpx.post(f"{lane.api_url}{path}", json=body,
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "priority_not_supported"
    assert "POST /v1/requests" in answer.json()["error"]["message"]


def test_requests_route_takes_the_endpoint(lane: Stack) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"endpoint": "/v1/responses", "input": prompt("[[sim:ttft=1.5]]"),
            "priority": "high"}
    accepted = httpx.post(f"{lane.api_url}/v1/requests", json=body, headers=headers, timeout=10)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    early = httpx.get(f"{lane.api_url}/v1/responses/{request_id}", headers=headers,
                      timeout=10).json()
    assert early["status"] in ("queued", "in_progress") and early["output"] == []

    def finished() -> dict[str, Any] | None:
        view = httpx.get(f"{lane.api_url}/v1/requests/{request_id}", headers=headers,
                         timeout=10).json()
        return view if view["status"] == "completed" else None

    view = wait_until(finished, timeout=30, message="the responses request to complete")
    response = view["result"]["response"]
    assert response["object"] == "response" and response["status"] == "completed"
    assert view["result"]["content"] == response["output"][0]["content"][0]["text"]
    by_request = httpx.get(f"{lane.api_url}/v1/responses/{request_id}", headers=headers,
                           timeout=10)
    assert by_request.json() == response


def test_a_killed_worker_fails_a_relayed_responses_stream_and_restarts_an_unstarted_one(
        redis_base_url: str, sim_url: str) -> None:
    """A Responses stream cannot be continued once it relayed events: the worker that takes it
    over ends it `failed` (retryable, saying why) and followers see an `error` after the events;
    one that had relayed nothing yet (a long time to first event) is simply made again."""
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator", api_keys={KEY: "a"},
        stream_lease_s=2.0, retry_backoff_base_s=0.02, retry_backoff_max_s=0.1,
        log_format="json")
    headers = {"Authorization": f"Bearer {KEY}"}
    with Stack(settings) as stack:
        api = stack.start_api(timeout=60)
        worker = stack.start_worker("stream", timeout=60)

        def submit(directive: str) -> str:
            body = {"endpoint": "/v1/responses", "input": prompt(directive), "priority": "high"}
            accepted = httpx.post(f"{api}/v1/requests", json=body, headers=headers, timeout=10)
            assert accepted.status_code == 202, accepted.text
            request_id: str = accepted.json()["id"]
            return request_id

        def view(request_id: str) -> dict[str, Any]:
            answer: dict[str, Any] = httpx.get(f"{api}/v1/requests/{request_id}",
                                               headers=headers, timeout=10).json()
            return answer

        relaying = submit("[[sim:tps=10,tokens=80]]")
        waiting = submit("[[sim:ttft=4,tokens=5]]")
        client = redis.Redis.from_url(settings.redis_url)
        try:
            log = Keys(settings.key_prefix).events(relaying)
            wait_until(lambda: client.xlen(log) > 8, 20, message="Responses events relayed")
            assert view(waiting)["status"] == "streaming"
        finally:
            client.close()
        worker.kill()
        stack.start_worker("stream", timeout=60)
        ended = wait_until(lambda: all(view(r)["status"] in ("completed", "failed")
                                       for r in (relaying, waiting)), 60, 0.2,
                           message="both requests terminal")
        assert ended
        failed = view(relaying)
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "worker_lost" and failed["error"]["retryable"]
        assert "Responses events" in failed["error"]["message"]
        logged = sse_events_at(api, relaying)
        assert logged[-1]["type"] == "error"
        assert [e["event"]["sequence_number"] for e in logged if e["type"] == "response"] == \
            list(range(len([e for e in logged if e["type"] == "response"])))
        made_again = view(waiting)
        assert made_again["status"] == "completed", made_again
        assert made_again["attempts"] == 2
        assert made_again["result"]["response"]["status"] == "completed"


def sse_events_at(api: str, request_id: str, after: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{api}/v1/requests/{request_id}/events",
                      headers={"Authorization": f"Bearer {KEY}", "Last-Event-ID": str(after)},
                      timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_a_cancelled_responses_stream_ends_with_an_error_and_stops_the_upstream(
        lane: Stack, sim_url: str) -> None:
    text = prompt("[[sim:tps=20,tokens=200]]")
    headers = {"Authorization": f"Bearer {KEY}"}
    kinds: list[str] = []
    with httpx.stream("POST", f"{lane.api_url}/v1/responses", headers=headers, timeout=60,
                      json={"model": MODEL, "input": text, "stream": True}) as response:
        request_id = response.headers["x-request-id"]
        for line in response.iter_lines():
            if not line.startswith("event: "):
                continue
            kinds.append(line[7:])
            if kinds.count("response.output_text.delta") == 3 and len(kinds) == 7:
                cancelled = httpx.delete(f"{lane.api_url}/v1/requests/{request_id}",
                                         headers=headers, timeout=10)
                assert cancelled.status_code == 200, cancelled.text
    assert kinds[-1] == "error" and "response.completed" not in kinds
    ph = prompt_hash([{"role": "user", "content": text}])
    wait_until(lambda: sim_stats(sim_url, ph)["streams_aborted"] == 1, 10,
               message="the upstream stream stopped")
    assert sim_stats(sim_url, ph)["streams_completed"] == 0


def test_a_failed_upstream_response_is_relayed_as_the_upstream_sent_it(
        router_sdk: openai.OpenAI, direct_sdk: openai.OpenAI, lane: Stack) -> None:
    text = prompt("[[sim:response_failed=4,tokens=20]]")
    via_router = dumped(router_sdk.responses.create(model=MODEL, input=text, stream=True))
    direct = dumped(direct_sdk.responses.create(model=MODEL, input=text, stream=True))
    assert stable(via_router) == stable(direct)
    assert via_router[-1]["type"] == "response.failed"
    made = router_sdk.responses.create(model=MODEL, input=text)
    assert made.status == "failed" and made.error is not None
    assert stable(made.model_dump(mode="json")) == stable(
        direct_sdk.responses.create(model=MODEL, input=text).model_dump(mode="json"))
    raw = router_sdk.responses.with_raw_response.create(model=MODEL, input=text)
    request_id = raw.headers["x-request-id"]
    record = httpx.get(f"{lane.api_url}/v1/requests/{request_id}",
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "upstream_response_failed"
    assert not record["error"]["retryable"]
    assert record["usage"]["completion_tokens"] == 4 and float(record["cost_usd"]) > 0
