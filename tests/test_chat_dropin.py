"""``POST /v1/chat/completions``: the official openai SDK (sync and async) reads the router
unchanged, stream and non-stream, through a real API and stream worker and the simulator;
requests built from the SDK's own param types (tools, content parts, response formats...)
reach the upstream unchanged and tool calls come back as the SDK expects them (issue 16)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionContentPartImageParam,
    ChatCompletionContentPartInputAudioParam,
    ChatCompletionContentPartTextParam,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionToolParam,
    ChatCompletionUserMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_last_request, sim_stats
from tests.support import Stack, wait_until

MODEL = "gpt-4o-mini"
KEY = "sk-router-tenant"


@pytest.fixture(scope="module")
def lane(redis_base_url: str, sim_url: str) -> Iterator[Stack]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
        api_keys={KEY: "tenant-a"}, retry_backoff_base_s=0.02, retry_backoff_max_s=0.1,
        stream_worker_concurrency=8, log_format="json",
    )
    with Stack(settings) as stack:
        stack.start_api(timeout=60)
        stack.start_worker("stream", timeout=60)
        yield stack


@pytest.fixture(scope="module")
def router_sdk(lane: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lane.api_url}/v1", api_key=KEY, max_retries=0)


def messages(directive: str = "") -> Any:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Drop-in {uuid.uuid4().hex} {directive}"}]


def direct_answer(sim_url: str, msgs: Any) -> str:
    sdk = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    reply = sdk.chat.completions.create(model=MODEL, messages=msgs)
    return reply.choices[0].message.content or ""


def test_sync_sdk_stream(router_sdk: openai.OpenAI, sim_url: str) -> None:
    msgs = messages("[[sim:tps=200,tokens=30]]")
    stream = router_sdk.chat.completions.create(
        model=MODEL, messages=msgs, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Priority": "high"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_answer(sim_url, msgs)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 30
    assert len({c.id for c in chunks}) == 1


def test_sync_sdk_non_stream(router_sdk: openai.OpenAI, sim_url: str) -> None:
    msgs = messages()
    reply = router_sdk.chat.completions.create(model=MODEL, messages=msgs)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == direct_answer(sim_url, msgs)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_async_sdk_stream_and_non_stream(lane: Stack, sim_url: str) -> None:
    msgs_stream, msgs_plain = messages("[[sim:tps=200,tokens=20]]"), messages()

    async def run() -> tuple[str, str]:
        sdk = openai.AsyncOpenAI(base_url=f"{lane.api_url}/v1", api_key=KEY, max_retries=0)
        try:
            stream = await sdk.chat.completions.create(
                model=MODEL, messages=msgs_stream, stream=True,
                extra_body={"priority": "normal"},
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices])
            reply = await sdk.chat.completions.create(
                model=MODEL, messages=msgs_plain)
            return text, reply.choices[0].message.content or ""
        finally:
            await sdk.close()

    streamed, plain = asyncio.run(run())
    assert streamed == direct_answer(sim_url, msgs_stream)
    assert plain == direct_answer(sim_url, msgs_plain)


def test_retries_and_resume_are_invisible_to_the_sdk(router_sdk: openai.OpenAI,
                                                     sim_url: str) -> None:
    msgs = messages("[[sim:fail=429,times=1,retry_after=0.05,drop_after=5,tokens=20]]")
    stream = router_sdk.chat.completions.create(model=MODEL, messages=msgs,
                                                stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == direct_answer(sim_url, msgs)


def test_low_priority_is_refused_with_a_clear_400(router_sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as by_header:
        router_sdk.chat.completions.create(model=MODEL, messages=messages(),
                                           extra_headers={"X-Priority": "low"})
    assert "POST /v1/requests" in by_header.value.message
    assert by_header.value.param == "X-Priority"
    with pytest.raises(openai.BadRequestError) as by_body:
        router_sdk.chat.completions.create(model=MODEL, messages=messages(),
                                           stream=True, extra_body={"priority": "low"})
    assert by_body.value.param == "priority"
    with pytest.raises(openai.BadRequestError) as bad:
        router_sdk.chat.completions.create(model=MODEL, messages=messages(),
                                           extra_headers={"X-Priority": "urgent"})
    assert "X-Priority" in bad.value.message


def test_auth_and_validation_apply(lane: Stack) -> None:
    stranger = openai.OpenAI(base_url=f"{lane.api_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=messages())
    r = httpx.post(f"{lane.api_url}/v1/chat/completions", json={"model": MODEL, "messages": []},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_upstream_4xx_maps_to_an_openai_error(router_sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as plain:
        router_sdk.chat.completions.create(model=MODEL, messages=messages("[[sim:fail=400]]"))
    assert plain.value.code == "upstream_400"
    stream = router_sdk.chat.completions.create(
        model=MODEL, messages=messages("[[sim:fail=400]]"), stream=True)
    with pytest.raises(openai.APIError) as streamed:
        list(stream)
    assert "400" in streamed.value.message


def test_client_going_away_cancels_the_request(router_sdk: openai.OpenAI, lane: Stack,
                                               sim_url: str) -> None:
    msgs = messages("[[sim:tps=20,tokens=300]]")
    stream = router_sdk.chat.completions.create(model=MODEL, messages=msgs,
                                                stream=True)
    request_id = stream.response.headers["x-request-id"]
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received >= 3:
            break
    stream.close()
    record_url = f"{lane.api_url}/v1/requests/{request_id}"
    headers = {"Authorization": f"Bearer {KEY}"}
    record = wait_until(
        lambda: (rec := httpx.get(record_url, headers=headers, timeout=5).json())["status"]
        == "cancelled" and rec, 10, message="request cancelled after the client left")
    wait_until(lambda: sim_stats(sim_url, prompt_hash(msgs))["streams_aborted"] == 1, 10,
               message="upstream stream aborted")
    record = wait_until(lambda: httpx.get(record_url, headers=headers, timeout=5).json()
                        if httpx.get(record_url, headers=headers, timeout=5).json()["usage"]
                        else None, 10, message="paid tokens recorded")
    assert 3 <= record["usage"]["completion_tokens"] < 300


def test_fast_and_general_paths_stream_alike(lane: Stack, sim_url: str) -> None:
    """Plain ``application/json`` takes the route's fast path; with a charset parameter the
    body goes through FastAPI's general handler. The SSE an SDK reads is the same."""
    msgs = messages("[[sim:tps=200,tokens=9]]")
    body = json.dumps({"model": MODEL, "messages": msgs, "stream": True, "priority": "high"})

    def read(content_type: str) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
        with httpx.stream("POST", f"{lane.api_url}/v1/chat/completions", content=body,
                          headers=headers, timeout=30) as response:
            assert response.status_code == 200
            lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        for chunk in chunks:  # ids and times differ per request, nothing else may
            chunk.pop("id"), chunk.pop("created")
        return chunks

    def text(chunks: list[dict[str, Any]]) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    def framing(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # tokens close together may share a chunk (the publisher coalesces), so compare the
        # text as a whole and every chunk that carries no text one by one
        return [c for c in chunks if not c["choices"][0]["delta"].get("content")]

    fast, general = read("application/json"), read("application/json; charset=utf-8")
    assert text(fast) == text(general) == direct_answer(sim_url, msgs)
    assert framing(fast) == framing(general)
    assert framing(fast)[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert framing(fast)[-1]["choices"][0]["finish_reason"] == "stop"


# --- issue 16: every request the SDK can make, tool calls relayed --------------------------

TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def agent_turn(directive: str = "[[sim:tool_calls=2]]") -> list[ChatCompletionMessageParam]:
    system: ChatCompletionSystemMessageParam = {"role": "system", "content": "Use tools."}
    user: ChatCompletionUserMessageParam = {
        "role": "user", "content": f"Weather and time? {uuid.uuid4().hex} {directive}"}
    return [system, user]


def calls_of(tool_calls: Any) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in tool_calls or ()]


def next_turn(msgs: list[ChatCompletionMessageParam], tool_calls: Any
              ) -> list[ChatCompletionMessageParam]:
    """The agent's next request: its previous turn (content null + tool_calls) and results."""
    assistant: ChatCompletionAssistantMessageParam = {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": c.id, "type": "function",
                        "function": {"name": c.function.name,
                                     "arguments": c.function.arguments}} for c in tool_calls]}
    results: list[ChatCompletionToolMessageParam] = [
        {"role": "tool", "tool_call_id": c.id, "content": f"result of {c.function.name}"}
        for c in tool_calls]
    return [*msgs, assistant, *results]


def test_an_agent_tool_call_conversation_works_through_the_drop_in(
        router_sdk: openai.OpenAI, lane: Stack, sim_url: str) -> None:
    """The turn that calls tools (non-stream and streamed, read with the SDK's own stream
    helper, which accumulates tool-call deltas), then the turn that sends the calls and their
    results back (``content: null`` + ``tool_calls``, then ``tool`` messages): once a 400
    "Idempotency-Key header: Field required"."""
    direct = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    msgs = agent_turn()
    expected = direct.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS)
    assert expected.choices[0].finish_reason == "tool_calls"
    want = calls_of(expected.choices[0].message.tool_calls)
    assert len(want) == 2

    reply = router_sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, tools=TOOLS, tool_choice="auto", parallel_tool_calls=True,
        extra_headers={"X-Priority": "high"})
    completion = reply.parse()
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.content is None
    assert calls_of(completion.choices[0].message.tool_calls) == want
    record = httpx.get(f"{lane.api_url}/v1/requests/{reply.headers['x-request-id']}",
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in record["result"]["message"]["tool_calls"]] == want

    with router_sdk.chat.completions.stream(model=MODEL, messages=msgs, tools=TOOLS) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds
    assert kinds.count("tool_calls.function.arguments.done") == 2
    assert final.choices[0].finish_reason == "tool_calls"
    assert calls_of(final.choices[0].message.tool_calls) == want

    follow_up = next_turn(msgs, expected.choices[0].message.tool_calls)
    answer = router_sdk.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == direct.chat.completions.create(
        model=MODEL, messages=follow_up, tools=TOOLS).choices[0].message.content
    streamed = router_sdk.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS,
                                                  stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        answer.choices[0].message.content


def test_tool_call_deltas_are_relayed_as_chunks(lane: Stack, sim_url: str) -> None:
    """On the wire: ``delta.tool_calls`` chunks with index, id, type and name first, then the
    arguments; joined per call they are exactly the upstream's calls."""
    msgs = agent_turn("[[sim:tool_calls=3,tps=200]]")
    direct = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    want = calls_of(direct.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS).choices[0].message.tool_calls)
    with httpx.stream("POST", f"{lane.api_url}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": msgs, "tools": TOOLS,
                            "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if "id" in delta:
            assert delta["index"] not in calls and delta["type"] == "function"
            calls[delta["index"]] = [delta["id"], delta["function"]["name"], ""]
        calls[delta["index"]][2] += delta["function"].get("arguments", "")
    assert [tuple(calls[i]) for i in sorted(calls)] == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def every_sdk_param(msgs: list[ChatCompletionMessageParam]) -> dict[str, Any]:
    """Keyword arguments of ``chat.completions.create`` covering what an SDK user may send."""
    image: ChatCompletionContentPartImageParam = {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                           "detail": "low"}}
    audio: ChatCompletionContentPartInputAudioParam = {
        "type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    text: ChatCompletionContentPartTextParam = {"type": "text", "text": "Describe these."}
    developer: ChatCompletionDeveloperMessageParam = {"role": "developer", "content": "Be terse."}
    parts: ChatCompletionUserMessageParam = {"role": "user", "content": [text, image, audio],
                                             "name": "alice"}
    tool_choice: ChatCompletionNamedToolChoiceParam = {
        "type": "function", "function": {"name": "get_weather"}}
    response_format: ResponseFormatJSONSchema = {
        "type": "json_schema", "json_schema": {
            "name": "answer", "strict": True,
            "schema": {"type": "object", "properties": {"text": {"type": "string"}},
                       "required": ["text"], "additionalProperties": False}}}
    return {
        "model": MODEL, "messages": [developer, parts, *msgs], "tools": TOOLS,
        "tool_choice": tool_choice, "parallel_tool_calls": False,
        "response_format": response_format, "stop": ["\n\n", "END"], "logprobs": True,
        "top_logprobs": 2, "seed": 7, "n": 1, "user": "user-1",
        "metadata": {"team": "search"}, "store": True, "reasoning_effort": "low",
        "temperature": 0.2, "top_p": 0.9, "frequency_penalty": 0.1, "presence_penalty": 0.1,
        "logit_bias": {"50256": -100}, "max_completion_tokens": 64, "service_tier": "auto",
        "modalities": ["text"], "prompt_cache_key": "k1", "safety_identifier": "s1",
    }


@pytest.mark.parametrize("stream", [False, True])
def test_every_sdk_field_reaches_the_upstream_unchanged(router_sdk: openai.OpenAI, sim_url: str,
                                                       stream: bool) -> None:
    """The body the SDK sends to the simulator directly and the body the router sends it for
    the same call are equal, but for ``stream``/``stream_options`` (the stream lane always
    streams and asks for usage)."""
    turn = agent_turn("[[sim:tool_calls=1]]")
    first = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    calls = first.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS)
    kwargs = every_sdk_param(next_turn(turn, calls.choices[0].message.tool_calls))
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})
    key = prompt_hash(kwargs["messages"])
    direct = first.chat.completions.create(**kwargs)
    sent_direct = sim_last_request(sim_url, key)
    routed = router_sdk.chat.completions.create(**kwargs)
    if stream:
        direct_text = "".join(c.choices[0].delta.content or "" for c in direct if c.choices)
        routed_text = "".join(c.choices[0].delta.content or "" for c in routed if c.choices)
    else:
        direct_text = direct.choices[0].message.content or ""
        routed_text = routed.choices[0].message.content or ""
    assert routed_text == direct_text and routed_text
    sent_routed = sim_last_request(sim_url, key)
    assert sent_routed.pop("stream") is True
    assert sent_routed.pop("stream_options") == {"include_usage": True}
    sent_direct.pop("stream", None), sent_direct.pop("stream_options", None)
    assert sent_routed == sent_direct
    [turn_sent] = [m for m in sent_routed["messages"] if m["role"] == "assistant"]
    assert turn_sent["content"] is None and turn_sent["tool_calls"]  # the agent's turn, as sent
