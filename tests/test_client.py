"""The Python client against the real API subprocess and Redis: submit, get, cancel, waiting for
the result (the record is moved to terminal with the store, as a lane would), and `enqueue`."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from hybrid_router.router.client import AsyncRouterClient, RouterClient, RouterError, SSEDecoder, enqueue
from hybrid_router.router.core import events as ev
from hybrid_router.router.core.errors import Conflict, ErrorCode, InvalidRequest
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from tests.support import Stack, wait_until

KEY_A, KEY_B = "client-key-a-0123456789", "client-key-b-0123456789"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def api(redis_base_url: str) -> Iterator[tuple[str, Settings]]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0",
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        api_keys={KEY_A: "tenant-a", KEY_B: "tenant-b"},
        log_format="json",
        _env_file=None,
    )
    with Stack(settings) as stack:
        yield stack.start_api(), settings


@pytest.fixture
def store(api: tuple[str, Settings]) -> Iterator[RequestStore]:
    client = redis.Redis.from_url(api[1].redis_url)
    yield RequestStore(client, api[1])
    client.close()


@pytest.fixture
def rc(api: tuple[str, Settings]) -> Iterator[RouterClient]:
    with RouterClient(api[0], api_key=KEY_A, timeout=10) as client:
        yield client


def complete(store: RequestStore, request_id: str, content: str = "the answer") -> None:
    """Do what a lane does at the end: the terminal transition with the result and `done`."""
    outcome = store.transition(
        request_id, "completed",
        fields={"result": {"content": content, "finish_reason": "stop"}},
        event=ev.done("stop", None, None, len(content)),
    )
    assert outcome.moved


def test_submit_get_and_cancel(rc: RouterClient) -> None:
    handle = rc.submit(MSG, priority="low", model="gpt-4o", metadata={"order": 1})
    assert len(handle.id) == 32 and handle.route == "batch"
    assert handle.status() == "queued"
    record = rc.get(handle.id)
    assert record["metadata"] == {"order": 1} and record["model"] == "gpt-4o"
    assert rc.handle(handle.id).route == "batch"  # learnt from the record
    cancelled = handle.cancel()
    assert cancelled["status"] == "cancelled" and cancelled["previous_status"] == "queued"
    assert handle.status() == "cancelled"
    assert handle.result(timeout=1)["status"] == "cancelled"


def test_errors_carry_the_servers_message(rc: RouterClient, api: tuple[str, Settings]) -> None:
    with pytest.raises(RouterError) as bad:
        rc.submit([], priority="low")
    assert bad.value.status == 400 and bad.value.param == "messages"
    assert "at least 1" in bad.value.message
    handle = rc.submit(MSG, priority="low")
    with RouterClient(api[0], api_key=KEY_B) as other, pytest.raises(RouterError) as missing:
        other.get(handle.id)
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with RouterClient(api[0], api_key="wrong") as anonymous, pytest.raises(RouterError) as auth:
        anonymous.submit(MSG)
    assert auth.value.status == 401 and "invalid API key" in auth.value.message
    handle.cancel()
    with pytest.raises(RouterError) as twice:
        handle.cancel()
    assert twice.value.status == 409


def test_result_waits_until_terminal(rc: RouterClient, store: RequestStore) -> None:
    handle = rc.submit(MSG, priority="low")
    timer = threading.Timer(0.5, complete, args=(store, handle.id))
    timer.start()
    started = time.monotonic()
    record = handle.result(timeout=10)
    timer.join()
    assert record["status"] == "completed"
    assert record["result"]["content"] == "the answer"
    assert time.monotonic() - started < 5


def test_result_times_out_without_busy_looping(rc: RouterClient) -> None:
    handle = rc.submit(MSG, priority="low")
    calls: list[str] = []
    rc.http.event_hooks["request"].append(lambda request: calls.append(request.url.path))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.result(timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3
    # Polling backs off from 0.1 s (SSE, when present, is one long request): a handful of calls.
    assert 1 <= len(calls) <= 12, calls


def test_async_client(api: tuple[str, Settings], store: RequestStore) -> None:
    async def scenario() -> None:
        async with AsyncRouterClient(api[0], api_key=KEY_A) as client:
            handle = await client.submit(MSG, priority="high")
            assert handle.route == "stream"
            assert await handle.status() == "dispatched"
            waiter = asyncio.ensure_future(handle.result(timeout=10))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await asyncio.to_thread(complete, store, handle.id, "async answer")
            record = await waiter
            assert record["result"]["content"] == "async answer"
            other = await client.submit(MSG, priority="low")
            assert (await other.cancel())["status"] == "cancelled"
            with pytest.raises(RouterError) as err:
                await client.get(uuid.uuid4().hex)
            assert err.value.status == 404

    asyncio.run(scenario())


def stream_messages(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    out = []
    for raw in r.lrange(f"{keys.celery_prefix()}{keys.stream_queue()}", 0, -1):
        message = orjson.loads(raw)
        out.append({"task": message["headers"]["task"],
                    "args": orjson.loads(base64.b64decode(message["body"]))[0]})
    return out


def test_enqueue_low_and_high_without_http(
    api: tuple[str, Settings], store: RequestStore, rc: RouterClient
) -> None:
    settings = api[1]
    keys = Keys(settings.key_prefix)
    low = enqueue(settings, MSG, priority="low", tenant="tenant-a", model="gpt-4o")
    assert low.encode() in store.redis.lrange(keys.pending("gpt-4o"), 0, -1)
    assert rc.get(low)["status"] == "queued"  # visible to the tenant through the API
    high = enqueue(settings, MSG, priority="high", tenant="tenant-a")
    assert {"task": "hr.stream.run", "args": [high]} in stream_messages(store.redis, keys)
    record = store.get(high)
    assert record is not None and record.route == "stream" and record.status == "dispatched"
    again = enqueue(settings, MSG, priority="low", idempotency_key="k-1")
    assert enqueue(settings, MSG, priority="low", idempotency_key="k-1") == again
    # A Python caller gets the domain's exceptions (no HTTP status codes).
    with pytest.raises(InvalidRequest) as bad:
        enqueue(settings, [{"role": "robot", "content": "x"}])
    assert bad.value.param == "messages.0.role" and bad.value.code == ErrorCode.INVALID_REQUEST
    with pytest.raises(Conflict) as conflict:
        enqueue(settings, [{"role": "user", "content": "other"}], idempotency_key="k-1")
    assert conflict.value.code == ErrorCode.IDEMPOTENCY_CONFLICT
    assert not hasattr(conflict.value, "status")


def test_wait_follows_a_record_completed_after_events(
    rc: RouterClient, store: RequestStore
) -> None:
    handle = rc.submit(MSG, priority="high")
    wait_until(lambda: store.get(handle.id) is not None, 5, message="record")
    store.emit(handle.id, [ev.token("par"), ev.token("tial")])
    complete(store, handle.id, "partial")
    assert handle.result(timeout=5)["result"]["content"] == "partial"


def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", "id: 3", "event: token", 'data: {"type":"token","seq":3,',
             'data: "content":"hi"}', "", "id: 4", "event: done",
             'data: {"type":"done","seq":4}', ""]
    events = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    assert events == [{"type": "token", "seq": 3, "content": "hi"}, {"type": "done", "seq": 4}]


def test_the_client_package_offers_the_redis_follower() -> None:
    """`follow_events` (pub/sub + replay log, no HTTP) is importable from the client package."""
    from hybrid_router.router import client
    from hybrid_router.router.core.subscribe import follow_events

    assert client.follow_events is follow_events


def test_stream_and_tokens_over_sse_with_resume(rc: RouterClient, store: RequestStore) -> None:
    handle = rc.submit(MSG, priority="high")
    store.emit(handle.id, [ev.token("Hel"), ev.token("lo ✓")])
    complete(store, handle.id, "Hello ✓")
    events = list(handle.stream())
    assert [e["type"] for e in events] == ["accepted", "token", "token", "done"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert "".join(handle.tokens()) == "Hello ✓"
    # Resuming after seq 2 (what a reconnect sends as Last-Event-ID) skips what was seen.
    assert [e["seq"] for e in handle.stream(after_seq=2)] == [3, 4]
