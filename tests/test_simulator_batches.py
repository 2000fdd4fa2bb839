"""The simulator's Files and Batch API, driven with the official SDK (sync and async).

Batches run on a sub-second turnaround; every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final

import openai
import orjson
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from hybrid_router.simulator.testing import running_simulator

MODEL = "gpt-4o-mini"
URL: Final = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with running_simulator(batch_turnaround_s=0.5, batch_cancel_s=0.1,
                           batch_max_lines=30, batch_max_bytes=20_000) as url:
        yield url


@pytest.fixture(scope="module")
def client(sim: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim, api_key="sk-test", max_retries=0)


def line(custom_id: str, text: str = "", model: str = MODEL, url: str = URL,
         **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [
                {"role": "user", "content": f"batch question {custom_id} {text}"}], **body}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(x) for x in lines) + b"\n"


def upload(client: openai.OpenAI, data: bytes) -> FileObject:
    return client.files.create(file=("input.jsonl", data), purpose="batch")


def submit(client: openai.OpenAI, data: bytes) -> Batch:
    f = upload(client, data)
    return client.batches.create(input_file_id=f.id, endpoint=URL, completion_window="24h",
                                 metadata={"test": "yes"})


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 10.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in TERMINAL:
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}"
        time.sleep(0.05)


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines() if x]


def uid() -> str:
    return uuid.uuid4().hex[:8]


# --- files ----------------------------------------------------------------------------------------
def test_file_upload_retrieve_content_delete(client: openai.OpenAI) -> None:
    data = jsonl([line("a")])
    f = upload(client, data)
    assert isinstance(f, FileObject)
    assert f.purpose == "batch" and f.bytes == len(data) and f.id.startswith("file-")
    assert client.files.retrieve(f.id).filename == "input.jsonl"
    assert client.files.content(f.id).content == data
    assert f.id in [x.id for x in client.files.list()]
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


# --- lifecycle ------------------------------------------------------------------------------------
def test_complete_flow_shuffled_output(client: openai.OpenAI) -> None:
    ids = [f"req-{i:02d}-{uid()}" for i in range(20)]
    b = submit(client, jsonl([line(i) for i in ids]))
    assert b.status == "validating" and b.metadata == {"test": "yes"}
    seen: set[str] = {b.status}
    deadline = time.monotonic() + 10
    while b.status not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.02)
        b = client.batches.retrieve(b.id)
        seen.add(b.status)
    assert b.status == "completed"
    assert {"in_progress", "completed"} <= seen
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == \
        (20, 20, 0)
    assert b.error_file_id is None and b.output_file_id is not None
    assert b.in_progress_at and b.completed_at and b.finalizing_at
    out = read_jsonl(client, b.output_file_id)
    got_ids = [x["custom_id"] for x in out]
    assert sorted(got_ids) == sorted(ids) and got_ids != ids  # shuffled like OpenAI
    by_id = {x["custom_id"]: x for x in out}
    first = by_id[ids[0]]
    assert first["error"] is None and first["id"].startswith("batch_req_")
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    completion = ChatCompletion.model_validate(first["response"]["body"])
    live = client.chat.completions.create(
        model=MODEL, messages=line(ids[0])["body"]["messages"])
    assert completion.choices[0].message.content == live.choices[0].message.content
    assert b.usage is not None and b.usage.output_tokens > 0


def test_line_errors_go_to_error_file(client: openai.OpenAI) -> None:
    ids = [uid() for _ in range(4)]
    lines = [line(ids[0], "[[sim:line_error=1]]"), line(ids[1], "[[sim:line_error=400]]"),
             line(ids[2]), line(ids[3], max_tokens=3)]
    b = wait_terminal(client, submit(client, jsonl(lines)).id)
    assert b.status == "completed"
    assert b.request_counts is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 2)
    errs = {x["custom_id"]: x for x in read_jsonl(client, b.error_file_id)}
    assert errs[ids[0]]["response"]["status_code"] == 500
    assert errs[ids[1]]["response"]["status_code"] == 400
    assert set(errs[ids[0]]["response"]["body"]["error"]) == {"message", "type", "param", "code"}
    assert errs[ids[0]]["error"] is None
    out = {x["custom_id"]: x for x in read_jsonl(client, b.output_file_id)}
    short = out[ids[3]]["response"]["body"]
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_all_failed_batch_has_only_error_file(client: openai.OpenAI) -> None:
    lines = [line(uid(), "[[sim:line_error=1]]") for _ in range(3)]
    b = wait_terminal(client, submit(client, jsonl(lines)).id)
    assert b.status == "completed"
    assert b.output_file_id is None and b.error_file_id is not None
    assert b.request_counts is not None and b.request_counts.failed == 3
    assert len(read_jsonl(client, b.error_file_id)) == 3


def _big_lines() -> list[dict[str, Any]]:
    return [line(uid(), "x " * 1500) for _ in range(10)]


@pytest.mark.parametrize(
    ("name", "payload", "code"),
    [
        ("invalid_json", jsonl([line("a")]) + b"{not json\n", "invalid_json_line"),
        ("duplicate", jsonl([line("same"), line("same")]), "duplicate_custom_id"),
        ("mixed_models", jsonl([line("a"), line("b", model="gpt-4o")]), "mismatched_model"),
        ("wrong_url", jsonl([line("a", url="/v1/embeddings")]), "invalid_url"),
        ("too_many_lines", jsonl([line(f"n{i}") for i in range(31)]), "too_many_requests"),
        ("too_big", jsonl(_big_lines()), "file_too_large"),
        ("directive", jsonl([line("a", "[[sim:batch=fail]]")]), "simulated_validation_failure"),
    ],
)
def test_validation_failures(client: openai.OpenAI, name: str, payload: bytes,
                             code: str) -> None:
    b = wait_terminal(client, submit(client, payload).id)
    assert b.status == "failed", name
    assert b.failed_at is not None
    assert b.errors is not None and b.errors.data
    assert b.errors.data[0].code == code
    assert b.output_file_id is None and b.error_file_id is None
    if code in ("invalid_json_line", "duplicate_custom_id", "invalid_url"):
        assert b.errors.data[0].line == 2 or code == "invalid_url"


def test_expired_batch_has_partial_results(client: openai.OpenAI) -> None:
    ids = [uid() for _ in range(6)]
    lines = [line(ids[0], "[[sim:batch=expire]]"), *[line(i) for i in ids[1:]]]
    b = wait_terminal(client, submit(client, jsonl(lines)).id)
    assert b.status == "expired" and b.expired_at is not None
    out = read_jsonl(client, b.output_file_id)
    errs = read_jsonl(client, b.error_file_id)
    assert len(out) == 3 and len(errs) == 3
    assert {x["custom_id"] for x in out} | {x["custom_id"] for x in errs} == set(ids)
    for e in errs:
        assert e["response"] is None and e["error"]["code"] == "batch_expired"
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == \
        (6, 3, 3)


def test_cancel_gives_partial_results(client: openai.OpenAI) -> None:
    ids = [uid() for _ in range(30)]
    lines = [line(ids[0], "[[sim:turnaround=4]]"), *[line(i) for i in ids[1:30]]]
    b = submit(client, jsonl(lines))
    deadline = time.monotonic() + 10
    while not (b.request_counts and b.request_counts.completed >= 1):
        assert time.monotonic() < deadline
        time.sleep(0.02)
        b = client.batches.retrieve(b.id)
    assert b.status == "in_progress"
    cancelled = client.batches.cancel(b.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    b = wait_terminal(client, b.id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    out = read_jsonl(client, b.output_file_id)
    errs = read_jsonl(client, b.error_file_id)
    assert 1 <= len(out) < 30 and len(out) + len(errs) == 30
    assert all(e["error"]["code"] == "batch_cancelled" for e in errs)
    assert b.request_counts is not None
    assert b.request_counts.completed == len(out) and b.request_counts.failed == len(errs)
    assert client.batches.cancel(b.id).status == "cancelled"  # idempotent
    done = wait_terminal(client, submit(client, jsonl([line(uid())])).id)
    with pytest.raises(openai.BadRequestError):  # a completed batch cannot be cancelled
        client.batches.cancel(done.id)


def test_list_batches_paginates(client: openai.OpenAI) -> None:
    made = [submit(client, jsonl([line(uid())])).id for _ in range(3)]
    page = client.batches.list(limit=2)
    assert len(page.data) == 2 and page.has_more
    assert page.data[0].id == made[-1]  # newest first
    all_ids = [b.id for b in client.batches.list(limit=2)]  # auto-pagination via `after`
    assert set(made) <= set(all_ids)
    assert len(all_ids) == len(set(all_ids))


def test_create_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=URL, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    f = upload(client, jsonl([line("a")]))
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint=URL,
                              completion_window="1h")  # type: ignore[arg-type]


def test_async_batch_flow(sim: str) -> None:
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=sim, api_key="k", max_retries=0) as c:
            ids = [uid() for _ in range(3)]
            f = await c.files.create(file=("in.jsonl", jsonl([line(i) for i in ids])),
                                     purpose="batch")
            b = await c.batches.create(input_file_id=f.id, endpoint=URL,
                                       completion_window="24h")
            deadline = time.monotonic() + 10
            while b.status not in TERMINAL:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
                b = await c.batches.retrieve(b.id)
            assert b.status == "completed" and b.output_file_id
            content = await c.files.content(b.output_file_id)
            assert sorted(orjson.loads(x)["custom_id"] for x in content.content.splitlines()) \
                == sorted(ids)

    asyncio.run(main())


def test_line_error_rate_keeps_counts_true() -> None:
    with running_simulator(batch_turnaround_s=0.3, line_error_rate=0.5, seed=11) as url:
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        b = wait_terminal(c, submit(c, jsonl([line(uid()) for _ in range(20)])).id)
        assert b.status == "completed" and b.request_counts is not None
        out = read_jsonl(c, b.output_file_id)
        errs = read_jsonl(c, b.error_file_id)
        assert 0 < len(errs) < 20
        assert (b.request_counts.completed, b.request_counts.failed) == (len(out), len(errs))


def test_no_batch_api_mode_is_404() -> None:
    with running_simulator(batch_api=False) as url:
        c = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            c.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            c.batches.list()
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_x")
        assert c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still chats"}])
