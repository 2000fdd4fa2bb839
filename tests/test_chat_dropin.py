"""``POST /v1/chat/completions``: the official openai SDK (sync and async) reads the router
unchanged, stream and non-stream, through a real API and stream worker and the simulator."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from settings import Settings
from simulator import prompt_hash
from simulator.testing import sim_stats
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
