"""The simulator speaks OpenAI's chat wire protocol: proven with the official SDK over real HTTP.

Every test uses its own prompt (a uuid in the text) so per-prompt counters and directive
``times`` never leak between tests sharing one simulator process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import typer
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from typer.testing import CliRunner

from hybrid_router.simulator import SimConfig, prompt_hash
from hybrid_router.simulator.generation import make_answer, remaining_after_prefill
from hybrid_router.simulator.testing import running_simulator, sim_stats

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with running_simulator(seed=7) as url:
        yield url


@pytest.fixture(scope="module")
def client(sim: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim, api_key="sk-test", max_retries=0)


def msgs(text: str = "") -> Any:
    """Chat messages with a unique prompt (typed Any: the SDK wants its TypedDicts)."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Tell me about queues {uuid.uuid4().hex} {text}"},
    ]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- models, plain completions --------------------------------------------------------------------
def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_completion_parses_and_is_deterministic(client: openai.OpenAI) -> None:
    m = msgs()
    a = client.chat.completions.create(model=MODEL, messages=m)
    b = client.chat.completions.create(model=MODEL, messages=m)
    other = client.chat.completions.create(model="gpt-4o", messages=m)
    assert isinstance(a, ChatCompletion)
    assert a.object == "chat.completion" and a.id.startswith("chatcmpl-")
    text = a.choices[0].message.content
    assert text and text == b.choices[0].message.content
    assert text != other.choices[0].message.content
    assert a.choices[0].finish_reason == "stop"
    assert a.choices[0].message.role == "assistant"
    assert a.usage is not None
    assert 20 <= a.usage.completion_tokens <= 60
    assert a.usage.completion_tokens == len(text.split())
    words = sum(len(str(x["content"]).split()) for x in m)
    assert words <= a.usage.prompt_tokens <= words + 20
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    assert a._request_id and a._request_id.startswith("req_")


def test_stream_equals_non_stream_with_usage_chunk(client: openai.OpenAI) -> None:
    m = msgs()
    plain = client.chat.completions.create(model=MODEL, messages=m)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=m, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content_of(chunks) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage == plain.usage
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == usage_chunk.usage.completion_tokens
    assert all((c.choices[0].delta.content or "").startswith(" ") for c in content_chunks)


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msgs(), stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_raw_sse_ends_with_done(sim: str) -> None:
    body = {"model": MODEL, "messages": msgs("[[sim:tokens=3]]"), "stream": True}
    r = httpx.post(sim + "/chat/completions", json=body,
                   headers={"Authorization": "Bearer k"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 3 + 1 + 1  # role, tokens, finish, [DONE]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(client: openai.OpenAI, param: str) -> None:
    m = msgs("[[sim:tokens=40]]")
    kwargs: dict[str, Any] = {param: 7}
    r = client.chat.completions.create(model=MODEL, messages=m, **kwargs)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 7
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=m, stream=True,
        stream_options={"include_usage": True}, **kwargs,
    ))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert content_of(chunks) == r.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_tokens_directive_sets_length_and_never_leaks(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=msgs("[[sim:tokens=123]]"))
    text = r.choices[0].message.content or ""
    assert r.usage is not None and r.usage.completion_tokens == 123
    assert "sim" not in text and "[[" not in text and "tokens=" not in text


def test_content_parts_are_accepted(client: openai.OpenAI) -> None:
    m: Any = [{"role": "user", "content": [{"type": "text", "text": f"parts {uuid.uuid4().hex}"}]}]
    r = client.chat.completions.create(model=MODEL, messages=m)
    assert r.choices[0].message.content


# --- faults ---------------------------------------------------------------------------------------
def test_429_retry_honours_retry_after(sim: str) -> None:
    m = msgs("[[sim:fail=429,times=1,retry_after=0.3]]")
    retrying = openai.OpenAI(base_url=sim, api_key="k", max_retries=2)
    start = time.monotonic()
    r = retrying.chat.completions.create(model=MODEL, messages=m)
    assert time.monotonic() - start >= 0.3
    assert r.choices[0].message.content
    stats = sim_stats(sim, prompt_hash(m))
    assert stats["requests"] == 2 and stats["errors_injected"] == 1


def test_429_without_retries_is_rate_limit_error(client: openai.OpenAI) -> None:
    m = msgs("[[sim:fail=429,times=2,retry_after=0.2]]")
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=MODEL, messages=m)
        assert info.value.response.headers["retry-after"] == "0.2"
        assert info.value.code == "rate_limit_exceeded"
    assert client.chat.completions.create(model=MODEL, messages=m)


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(client: openai.OpenAI, status: int) -> None:
    m = msgs(f"[[sim:fail={status}]]")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=m)
    assert info.value.status_code == status
    assert info.value.type == "server_error"
    with pytest.raises(openai.InternalServerError):  # no `times`: fails every time
        client.chat.completions.create(model=MODEL, messages=m, stream=True)


def test_missing_bearer_is_401(sim: str) -> None:
    r = httpx.post(sim + "/chat/completions", json={"model": MODEL, "messages": msgs()})
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_route_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.get("/no/such/thing", cast_to=object)


def test_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.param == "messages"


def test_dropped_stream_resumes_with_assistant_prefill(client: openai.OpenAI, sim: str) -> None:
    m = msgs("[[sim:drop_after=5]]")
    full = client.chat.completions.create(model=MODEL, messages=m)
    got: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(
                model=MODEL, messages=m, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert len(got) == 5
    prefix = "".join(got)
    resumed = list(client.chat.completions.create(
        model=MODEL, messages=[*m, {"role": "assistant", "content": prefix}],
        stream=True, stream_options={"include_usage": True},
    ))
    assert prefix + content_of(resumed) == full.choices[0].message.content
    assert full.usage is not None and resumed[-1].usage is not None
    assert resumed[-1].usage.completion_tokens == full.usage.completion_tokens - 5
    stats = sim_stats(sim, prompt_hash(m))
    assert stats["streams_dropped"] == 1 and stats["streams_completed"] == 1
    assert stats["continuations"] == 1 and stats["requests"] == 3
    # One full answer (the non-streamed one); the resumed stream finished a continuation.
    assert stats["continuations_completed"] == 1 and stats["completions"] == 1


def test_disconnect_stops_generation(client: openai.OpenAI, sim: str) -> None:
    m = msgs("[[sim:tokens=500,tps=50]]")
    stream = client.chat.completions.create(model=MODEL, messages=m, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_for(lambda: sim_stats(sim, prompt_hash(m))["streams_aborted"] == 1)
    assert sim_stats(sim, prompt_hash(m))["streams_completed"] == 0


def test_ttft_and_tps_directives(client: openai.OpenAI) -> None:
    m = msgs("[[sim:ttft=0.3,tps=50,tokens=10]]")
    start = time.monotonic()
    stream = client.chat.completions.create(model=MODEL, messages=m, stream=True)
    first_content: float | None = None
    for chunk in stream:
        if first_content is None and chunk.choices and chunk.choices[0].delta.content:
            first_content = time.monotonic() - start
    total = time.monotonic() - start
    assert first_content is not None and first_content >= 0.3
    assert total >= 0.3 + 9 / 50 - 0.02
    assert total < 3


def test_stats_totals(sim: str, client: openai.OpenAI) -> None:
    before = sim_stats(sim)["totals"]["requests"]
    client.chat.completions.create(model=MODEL, messages=msgs())
    after = sim_stats(sim)
    assert after["totals"]["requests"] == before + 1
    assert "prompts" in after and "files" in after


# --- async client ---------------------------------------------------------------------------------
def test_async_client_stream_errors_and_drop(sim: str) -> None:
    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=sim, api_key="k", max_retries=0)
        async with aclient:
            m = msgs()
            plain = await aclient.chat.completions.create(
                model=MODEL, messages=m)
            stream = await aclient.chat.completions.create(
                model=MODEL, messages=m, stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            assert content_of(chunks) == plain.choices[0].message.content
            with pytest.raises(openai.RateLimitError):
                await aclient.chat.completions.create(
                    model=MODEL, messages=msgs("[[sim:fail=429]]"))
            with pytest.raises(openai.InternalServerError):
                await aclient.chat.completions.create(
                    model=MODEL, messages=msgs("[[sim:fail=500,times=1]]"))
            dm = msgs("[[sim:drop_after=2]]")
            got = ""
            with pytest.raises(openai.APIConnectionError):
                async for c in await aclient.chat.completions.create(
                        model=MODEL, messages=dm, stream=True):
                    got += (c.choices[0].delta.content or "") if c.choices else ""
            rest = await aclient.chat.completions.create(
                model=MODEL, messages=[*dm, {"role": "assistant", "content": got}])
            whole = await aclient.chat.completions.create(
                model=MODEL, messages=dm)
            assert got + (rest.choices[0].message.content or "") == \
                whole.choices[0].message.content
            # Many concurrent streams through one client.
            streams = await asyncio.gather(*[
                aclient.chat.completions.create(model=MODEL, messages=msgs(), stream=True)
                for _ in range(20)
            ])
            for s in streams:
                assert content_of([c async for c in s])

    asyncio.run(main())


# --- knobs ----------------------------------------------------------------------------------------
def test_rate_faults_and_api_keys() -> None:
    with running_simulator(rate_drop=1.0, drop_after_tokens=3, rate_429=0.0,
                           api_keys=["sk-good"]) as url:
        bad = openai.OpenAI(base_url=url, api_key="sk-bad", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url, api_key="sk-good", max_retries=0)
        got = 0
        with pytest.raises(openai.APIConnectionError):
            for c in good.chat.completions.create(
                    model=MODEL, messages=msgs(), stream=True):
                got += bool(c.choices and c.choices[0].delta.content)
        assert got == 3
    with running_simulator(rate_429=1.0, retry_after_s=0.05, seed=3) as url:
        limited = openai.OpenAI(base_url=url, api_key="k", max_retries=1)
        with pytest.raises(openai.RateLimitError):
            limited.chat.completions.create(model=MODEL, messages=msgs())
        assert sim_stats(url)["totals"]["errors_injected"] == 2


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TTFT_S", "0.25")
    monkeypatch.setenv("SIM_BATCH_API", "false")
    cfg = SimConfig()
    assert cfg.ttft_s == 0.25 and cfg.batch_api is False


def test_cli_register_adds_sim_command() -> None:
    from hybrid_router.simulator.cli import register

    app = typer.Typer()

    @app.command()
    def other() -> None:
        """Another command, so typer keeps subcommands."""

    register(app)
    result = CliRunner().invoke(app, ["sim", "--help"])
    assert result.exit_code == 0
    for flag in ("--host", "--port", "--ttft-s", "--tokens-per-s", "--batch-turnaround-s",
                 "--no-batch-api", "--rate-429"):
        assert flag in result.output


def test_prefill_continuation_math() -> None:
    tokens = [" alpha", " beta", " gamma", " delta"]
    assert remaining_after_prefill(tokens, " alpha beta") == [" gamma", " delta"]
    assert remaining_after_prefill(tokens, " alpha be") == ["ta", " gamma", " delta"]
    assert remaining_after_prefill(tokens, "".join(tokens)) == []
    m = [{"role": "user", "content": "hi"}]
    full = make_answer(m, MODEL, seed=0, length=None, limit=None, min_tokens=20, max_tokens=60)
    rest = make_answer([*m, {"role": "assistant", "content": "".join(full.tokens[:4])}], MODEL,
                       seed=0, length=None, limit=None, min_tokens=20, max_tokens=60)
    assert rest.tokens == full.tokens[4:]
    assert prompt_hash(m) == prompt_hash([*m, {"role": "assistant", "content": "x"}])
