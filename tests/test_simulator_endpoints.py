"""The simulator's ``/v1/responses`` and ``/v1/embeddings``, plainly and in batches, through the
official openai SDK: deterministic answers with usage, the same directives as chat, and batch
lines answered exactly as the live endpoint answers them."""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from typing import Any

import openai
import pytest

from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import sim_stats
from tests.support import without_fields

VOLATILE = frozenset({"id", "item_id", "created_at"})


@pytest.fixture
def sdk(sim_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim_url, api_key="sk-sim-test", max_retries=0)


def test_responses_streamed_and_not_are_the_same_answer(sdk: openai.OpenAI) -> None:
    text = f"sim responses {uuid.uuid4().hex}"
    plain = sdk.responses.create(model="gpt-4o-mini", input=text)
    events = list(sdk.responses.create(model="gpt-4o-mini", input=text, stream=True))
    final = events[-1]
    assert final.type == "response.completed"
    assert without_fields(final.response.model_dump(mode="json"), VOLATILE) == \
        without_fields(plain.model_dump(mode="json"), VOLATILE)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert plain.usage is not None
    assert plain.usage.output_tokens == len(
        [e for e in events if e.type == "response.output_text.delta"])
    # The same prompt as a chat request gets the same text.
    chat = sdk.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": text}])
    assert chat.choices[0].message.content == plain.output_text


def test_responses_honour_directives(sdk: openai.OpenAI, sim_url: str) -> None:
    text = f"sim fail {uuid.uuid4().hex} [[sim:fail=503,times=1]]"
    with pytest.raises(openai.InternalServerError):
        sdk.responses.create(model="gpt-4o-mini", input=text)
    assert sdk.responses.create(model="gpt-4o-mini", input=text).status == "completed"
    ph = prompt_hash([{"role": "user", "content": text}])
    assert sim_stats(sim_url, ph)["errors_injected"] == 1


def test_embeddings_are_deterministic_unit_vectors(sdk: openai.OpenAI) -> None:
    inputs = [f"vector {uuid.uuid4().hex}", "same words"]
    first = sdk.embeddings.create(model="text-embedding-3-small", input=inputs)
    floats = sdk.embeddings.create(model="text-embedding-3-small", input=inputs,
                                   encoding_format="float")
    alone = sdk.embeddings.create(model="text-embedding-3-small", input=inputs[1])
    assert [d.embedding for d in first.data] == [d.embedding for d in floats.data]
    assert alone.data[0].embedding == first.data[1].embedding
    assert first.data[0].embedding != first.data[1].embedding
    assert math.isclose(sum(v * v for v in first.data[0].embedding), 1.0, rel_tol=1e-5)
    other = sdk.embeddings.create(model="text-embedding-3-large", input=inputs[1])
    assert other.data[0].embedding != alone.data[0].embedding
    short = sdk.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]],
                                  dimensions=16)
    assert len(short.data[0].embedding) == 16 and short.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError):
        sdk.embeddings.create(model="text-embedding-3-small", input=[])


def batch_of(sdk: openai.OpenAI, endpoint: str, bodies: list[dict[str, Any]]) -> Any:
    lines = "\n".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": endpoint,
                                  "body": body}) for i, body in enumerate(bodies))
    upload = sdk.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    batch = sdk.batches.create(input_file_id=upload.id, endpoint=endpoint,  # type: ignore[arg-type]
                               completion_window="24h")
    deadline = time.monotonic() + 20
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
        batch = sdk.batches.retrieve(batch.id)
    return batch


@pytest.mark.parametrize("endpoint", ["/v1/responses", "/v1/embeddings"])
def test_batch_lines_are_answered_as_the_live_endpoint(sdk: openai.OpenAI, endpoint: str) -> None:
    tag = uuid.uuid4().hex
    if endpoint == "/v1/responses":
        bodies = [{"model": "gpt-4o-mini", "input": f"line {tag} {i}"} for i in range(3)]
    else:
        bodies = [{"model": "text-embedding-3-small", "input": [f"line {tag} {i}", "x"],
                   "encoding_format": "float"} for i in range(3)]
    batch = batch_of(sdk, endpoint, bodies)
    assert batch.status == "completed" and batch.endpoint == endpoint
    out = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
    by_id = {o["custom_id"]: o["response"]["body"] for o in out}
    for i, body in enumerate(bodies):
        live = sdk.post(endpoint.removeprefix("/v1"), body=body, cast_to=dict[str, Any])
        assert without_fields(by_id[f"c{i}"], VOLATILE) == without_fields(live, VOLATILE)


def test_a_batch_line_for_another_endpoint_fails_validation(sdk: openai.OpenAI) -> None:
    batch = batch_of(sdk, "/v1/embeddings", [{"model": "gpt-4o-mini", "messages": []}])
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
