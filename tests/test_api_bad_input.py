"""Every kind of bad input gets a clear 4xx naming the field, and NOTHING is stored or queued:
after each case the test prefix's whole keyspace (records, queues, Celery's lists) is unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from tests.support import Stack

KEY = "key-bad-input-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
LIMIT = 8192
OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def api(redis_base_url: str) -> Iterator[tuple[str, Settings]]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0",
        key_prefix=f"t{uuid.uuid4().hex[:10]}",
        api_keys={KEY: "tenant-x"},
        allowed_models=["gpt-4o-mini", "gpt-4o"],
        max_body_bytes=LIMIT,
        log_format="json",
        _env_file=None,
    )
    with Stack(settings) as stack:
        yield stack.start_api(), settings


def keyspace(r: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key of the prefix (ours and Celery's) with its size: any write shows up here."""
    out: dict[bytes, Any] = {}
    for pattern in (f"{prefix}:*", f"{prefix}.*"):
        for key in r.scan_iter(match=pattern, count=1000):
            raw_kind = r.type(key)
            kind = raw_kind.decode() if isinstance(raw_kind, bytes) else str(raw_kind)
            size = {"list": r.llen, "zset": r.zcard, "set": r.scard, "hash": r.hlen,
                    "stream": r.xlen}.get(kind)
            out[key] = (kind, size(key) if size else r.get(key))
    return out


@pytest.fixture
def unchanged(api: tuple[str, Settings], redis_base_url: str) -> Iterator[None]:
    """Asserts after the test that the prefix's keyspace is exactly as before it."""
    r = redis.Redis.from_url(f"{redis_base_url}/0")
    prefix = api[1].key_prefix
    before = keyspace(r, prefix)
    yield
    after = keyspace(r, prefix)
    r.close()
    assert after == before, f"bad input changed Redis: {set(after) ^ set(before)}"


def post(url: str, content: bytes | Any, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/requests", content=content, headers=headers, timeout=10)


def js(value: Any) -> bytes:
    return orjson.dumps(value)


CASES: list[tuple[str, bytes, int, str, str]] = [
    # (id, raw body, status, param, a word the message must contain)
    ("malformed-json", b'{"messages": [', 400, "body", "JSON"),
    ("not-an-object", b"[1, 2]", 400, "body", "object"),
    ("missing-messages", js({"priority": "low"}), 400, "messages", "messages"),
    ("empty-messages", js({"messages": []}), 400, "messages", "at least 1"),
    ("messages-not-a-list", js({"messages": "hi"}), 400, "messages", "list"),
    ("message-without-role", js({"messages": [{"content": "x"}]}), 400, "messages.0.role",
     "role"),
    ("message-without-content", js({"messages": [{"role": "user"}]}), 400,
     "messages.0.content", "content"),
    ("unknown-role", js({"messages": [{"role": "wizard", "content": "x"}]}), 400,
     "messages.0.role", "user"),
    ("unknown-priority", js({"messages": OK_MSG, "priority": "urgent"}), 400, "priority", "low"),
    ("model-not-allowed", js({"messages": OK_MSG, "model": "gpt-5-ultra"}), 400, "model",
     "not allowed"),
    ("max-tokens-zero", js({"messages": OK_MSG, "max_tokens": 0}), 400, "max_tokens",
     "greater than 0"),
    ("max-tokens-negative", js({"messages": OK_MSG, "max_tokens": -5}), 400, "max_tokens",
     "greater than 0"),
    ("negative-deadline", js({"messages": OK_MSG, "deadline_s": -1}), 400, "deadline_s",
     "greater than 0"),
    ("stream-on-low", js({"messages": OK_MSG, "priority": "low", "stream": True}), 400, "stream",
     "batch"),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400,
     "messages.0.content", "surrogate"),
    ("lone-low-surrogate-in-part",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', 400,
     "messages.0.content.0.text", "surrogate"),
    ("budget-below-prompt", js({"messages": [{"role": "user", "content": "x" * 4000}],
                                "max_cost_usd": "0.0000001"}), 400, "max_cost_usd", "budget"),
]


@pytest.mark.parametrize(("body", "status", "param", "word"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
@pytest.mark.usefixtures("unchanged")
def test_bad_body_is_refused_and_nothing_is_stored(
    api: tuple[str, Settings], body: bytes, status: int, param: str, word: str
) -> None:
    resp = post(api[0], body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert word.lower() in error["message"].lower(), error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.usefixtures("unchanged")
def test_body_over_the_limit_with_content_length(api: tuple[str, Settings]) -> None:
    body = js({"messages": [{"role": "user", "content": "x" * (LIMIT * 2)}]})
    resp = post(api[0], body)
    assert resp.status_code == 413
    assert resp.json()["error"]["param"] == "body"
    assert str(LIMIT) in resp.json()["error"]["message"]


@pytest.mark.usefixtures("unchanged")
def test_body_over_the_limit_chunked(api: tuple[str, Settings]) -> None:
    payload = js({"messages": [{"role": "user", "content": "x" * (LIMIT * 2)}]})

    def chunks() -> Iterator[bytes]:  # a generator makes httpx send Transfer-Encoding: chunked
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    resp = post(api[0], chunks())
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "body_too_large"
    assert resp.json()["error"]["param"] == "body"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Content-Type": "application/json"}, "missing_api_key"),
        ({"Content-Type": "application/json", "Authorization": "Bearer wrong-key"}, "invalid_api_key"),
        ({"Content-Type": "application/json", "Authorization": f"Basic {KEY}"}, "missing_api_key"),
    ],
    ids=["missing", "wrong", "not-bearer"],
)
@pytest.mark.usefixtures("unchanged")
def test_missing_or_wrong_api_key_is_401(
    api: tuple[str, Settings], headers: dict[str, str], code: str
) -> None:
    resp = post(api[0], js({"messages": OK_MSG, "priority": "low"}), headers=headers)
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == code
    # GET and DELETE are guarded the same way.
    rid = uuid.uuid4().hex
    assert httpx.get(f"{api[0]}/v1/requests/{rid}", headers=headers).status_code == 401
    assert httpx.delete(f"{api[0]}/v1/requests/{rid}", headers=headers).status_code == 401


def test_duplicate_idempotency_key_with_a_different_body_is_409(
    api: tuple[str, Settings], redis_base_url: str
) -> None:
    url, settings = api
    body = {"messages": OK_MSG, "priority": "low", "idempotency_key": "invoice-7"}
    first = post(url, js(body))
    assert first.status_code == 202
    r = redis.Redis.from_url(f"{redis_base_url}/0")
    before = keyspace(r, settings.key_prefix)
    conflict = post(url, js({**body, "messages": [{"role": "user", "content": "other"}]}))
    assert conflict.status_code == 409
    assert conflict.json()["error"]["param"] == "idempotency_key"
    assert "different body" in conflict.json()["error"]["message"]
    replay = post(url, js(body))
    assert replay.status_code == 200 and replay.json()["idempotent_replay"] is True
    assert replay.json()["id"] == first.json()["id"]
    assert keyspace(r, settings.key_prefix) == before  # neither the 409 nor the replay wrote
    queue = r.lrange(Keys(settings.key_prefix).pending("gpt-4o-mini"), 0, -1)
    assert queue == [first.json()["id"].encode()]
    r.close()
