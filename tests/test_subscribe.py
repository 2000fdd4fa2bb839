"""`hybrid_router.router.core.subscribe`: following a request straight from Redis (sync and async), however late.

Requests are accepted the way `enqueue()` does it (intake + the Celery stream queue) and streamed
by a real stream worker subprocess; the subscriber reads only Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.dispatch import CeleryStreamDispatcher
from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.router.core.store import RequestStore
from hybrid_router.router.core.subscribe import afollow_events, follow_events
from hybrid_router.settings import Settings
from hybrid_router.workers.celery_app import create_celery
from tests.support import Stack, delete_prefix

MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def lane(redis_base_url: str, sim_url: str) -> Iterator[Stack]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
        stream_worker_concurrency=8, log_format="json",
    )
    stack = Stack(settings)
    try:
        stack.start_worker("stream", timeout=60)
        yield stack
    finally:
        stack.stop()
        delete_prefix(settings.redis_url, settings.key_prefix)


@pytest.fixture(scope="module")
def client(lane: Stack) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(lane.settings.redis_url)
    yield c
    c.close()


def messages(directive: str = "") -> Any:
    return [{"role": "user", "content": f"Subscribe {uuid.uuid4().hex} {directive}"}]


def enqueue(lane: Stack, client: redis.Redis, msgs: list[dict[str, Any]]) -> str:
    req = SubmitRequest.model_validate({"model": MODEL, "messages": msgs, "priority": "high"})
    store = RequestStore(client, lane.settings)
    dispatcher = CeleryStreamDispatcher(create_celery(lane.settings))
    return accept_sync(prepare(req, "default", lane.settings), store, dispatcher).record.id


def direct_answer(sim_url: str, msgs: Any) -> str:
    sdk = openai.OpenAI(base_url=sim_url, api_key="sk-test", max_retries=0)
    reply = sdk.chat.completions.create(model=MODEL, messages=msgs)
    return reply.choices[0].message.content or ""


def check(events: list[dict[str, Any]], expected: str, first_seq: int = 1) -> None:
    assert [e["seq"] for e in events] == list(range(first_seq, first_seq + len(events)))
    assert events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == expected


def test_follow_events_live_is_complete(lane: Stack, client: redis.Redis, sim_url: str) -> None:
    msgs = messages("[[sim:tps=200,tokens=40]]")
    request_id = enqueue(lane, client, msgs)
    events = list(follow_events(client, lane.settings, request_id, timeout=20))
    check(events, direct_answer(sim_url, msgs))


def test_follow_events_after_the_end_and_from_a_seq(lane: Stack, client: redis.Redis,
                                                    sim_url: str) -> None:
    msgs = messages()
    request_id = enqueue(lane, client, msgs)
    full = list(follow_events(client, lane.settings, request_id, timeout=20))
    late = list(follow_events(client, lane.settings, request_id, timeout=5))
    assert late == full
    # (The simulator sends a whole answer at once here, so tokens may be coalesced into few
    # events: resume after `started`, and after the final event, where nothing is left.)
    resumed = list(follow_events(client, lane.settings, request_id, after_seq=2, timeout=5))
    assert resumed == full[2:]
    assert list(follow_events(client, lane.settings, request_id, after_seq=full[-1]["seq"],
                              timeout=5)) == []
    check(full, direct_answer(sim_url, msgs))


def test_afollow_events_live_is_complete(lane: Stack, client: redis.Redis, sim_url: str) -> None:
    msgs = messages("[[sim:tps=200,tokens=30]]")
    request_id = enqueue(lane, client, msgs)

    async def collect() -> list[dict[str, Any]]:
        aclient = aioredis.Redis.from_url(lane.settings.redis_url)
        try:
            return [e async for e in afollow_events(aclient, lane.settings, request_id,
                                                    timeout=20)]
        finally:
            await aclient.aclose()

    check(asyncio.run(collect()), direct_answer(sim_url, msgs))


def test_follow_events_times_out_without_a_final_event(lane: Stack, client: redis.Redis) -> None:
    store = RequestStore(client, lane.settings)
    request_id = uuid.uuid4().hex
    store.redis.hset(store.keys.record(request_id), "status", "streaming")
    store.emit(request_id, [ev.token(" only")], guard=False)
    seen: list[dict[str, Any]] = []
    with pytest.raises(TimeoutError):
        for event in follow_events(client, lane.settings, request_id, timeout=0.5):
            seen.append(event)
    assert [e["content"] for e in seen] == [" only"]
