"""Hostile input against every route: a clear 4xx in OpenAI's error shape, never a 500, and
nothing queued.

The API runs as a real subprocess (uvicorn, as in production) with auth on and no workers, so
anything it accepted would stay visible in Redis: after each hostile request the test asserts
that the key prefix's keyspace is exactly as before (no record, no pending entry, no Celery
message). The corpus covers malformed and oversized bodies, deep nesting, wrong types, Unicode
edges (lone surrogates, overlong UTF-8, BOM), injection-shaped ids and keys (path traversal,
Redis glob characters, CRLF), huge headers and huge message counts; and the cases of issue 16
(loose types, decimal overflow, bad callback URLs and ports, resume cursors beyond Redis's
stream ids, a forged Host header).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import redis

from hybrid_router.router.core.callback_signature import verify_signature
from hybrid_router.router.core.keys import Keys, bounded_keys
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.callbacks import deliver_callback
from tests.batch_helpers import submit_low
from tests.callback_receiver import callback_receiver
from tests.support import REPO_ROOT, Stack, delete_prefix, wait_until

KEY_A = "sk-hostile-alpha"
KEY_B = "sk-hostile-beta"
KEY_ADMIN = "sk-hostile-admin"
PUBLIC_BASE_URL = "https://router.example.test"
ROUTES_WITH_BODY = ("/v1/requests", "/v1/chat/completions", "/v1/responses", "/v1/embeddings")
DEEP = 10_000
# Well-formed but unknown (every test runs on a fresh key prefix). Fixed, not random: test ids
# built from it must be the same in every pytest-xdist worker that collects this module.
REAL_ID = "7df0cf8fb2a240a58038a17e0bfbbf87"


@dataclass
class HostileApi:
    url: str
    settings: Settings
    redis: redis.Redis
    paths: dict[str, Any] = field(default_factory=dict)

    def keyspace(self) -> dict[str, Any]:
        """Every key under the prefix with a size, so a new entry anywhere shows up."""
        prefix = self.settings.key_prefix
        out: dict[str, Any] = {}
        for pattern in (f"{prefix}:*", f"{prefix}.*"):
            for raw in self.redis.scan_iter(match=pattern, count=1000):
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                raw_kind = self.redis.type(raw)
                kind = raw_kind.decode() if isinstance(raw_kind, bytes) else str(raw_kind)
                size: Any = None
                if kind == "list":
                    size = self.redis.llen(raw)
                elif kind == "zset":
                    size = self.redis.zcard(raw)
                elif kind == "stream":
                    size = self.redis.xlen(raw)
                elif kind == "hash":
                    size = self.redis.hlen(raw)
                elif kind == "set":
                    size = self.redis.scard(raw)
                out[key] = (kind, size)
        return out


@pytest.fixture(scope="module")
def api(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileApi]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    settings = Settings(
        redis_url=f"{redis_base_url}/0",
        key_prefix=prefix,
        upstream_base_url="http://127.0.0.1:9/v1",  # nothing must ever reach an upstream
        upstream_api_key="sk-unused",
        api_keys={KEY_A: "alpha", KEY_B: "beta", KEY_ADMIN: "admin"},
        admin_tenants=["admin"],
        callback_allowed_hosts=["localhost"],  # ports 80 and 443 only
        public_base_url=PUBLIC_BASE_URL,
        log_format="json",
    )
    stack = Stack(settings, workdir=Path(tmp_path_factory.mktemp("hostile")))
    client = redis.Redis.from_url(settings.redis_url)
    try:
        url = stack.start_api()
        paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
        yield HostileApi(url, settings, client, paths)
    finally:
        stack.stop()
        client.close()
        delete_prefix(settings.redis_url, prefix)


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_clear_4xx(response: httpx.Response, case: str) -> None:
    """A 4xx, with OpenAI's error shape and a non-empty message when the body is JSON."""
    assert 400 <= response.status_code < 500, (
        f"{case}: expected a 4xx, got {response.status_code}: {response.text[:500]}"
    )
    if response.headers.get("content-type", "").startswith("application/json"):
        error = response.json().get("error")
        assert isinstance(error, dict), f"{case}: not OpenAI's error shape: {response.text[:300]}"
        assert error.get("message"), f"{case}: empty error message"
        assert error.get("type"), f"{case}: no error type"


# --- the corpus ----------------------------------------------------------------------------------

def _msg(content: Any = "hi", role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": content}


def _body(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"messages": [_msg()]}
    base.update(fields)
    return base


def _raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE_BODIES: dict[str, bytes] = {
    # malformed
    "empty": b"",
    "not-json": b"hello",
    "truncated": b'{"messages": [{"role": "user", "content": "hi"',
    "trailing-garbage": b'{"messages": [{"role": "user", "content": "hi"}]} xyz',
    "json-null": b"null",
    "json-array": b"[]",
    "json-string": b'"messages"',
    "json-number": b"42",
    "duplicate-keys-bad-last": b'{"messages": [{"role": "user", "content": "hi"}], "messages": 1}',
    # missing / wrongly typed fields
    "no-messages": _raw({"model": "gpt-4o-mini"}),
    "messages-empty": _raw({"messages": []}),
    "messages-object": _raw({"messages": {"role": "user", "content": "hi"}}),
    "messages-string": _raw({"messages": "hi"}),
    "message-not-object": _raw({"messages": ["hi"]}),
    "role-unknown": _raw({"messages": [_msg(role="root")]}),
    "role-number": _raw({"messages": [{"role": 1, "content": "hi"}]}),
    "content-number": _raw({"messages": [_msg(12)]}),
    "content-missing": _raw({"messages": [{"role": "user"}]}),
    "content-parts-not-objects": _raw({"messages": [_msg([1, 2, 3])]}),
    "model-number": _raw(_body(model=5)),
    "model-empty": _raw(_body(model="")),
    "model-huge": _raw(_body(model="m" * 5000)),
    "priority-unknown": _raw(_body(priority="urgent")),
    "priority-list": _raw(_body(priority=["high"])),
    "max-tokens-negative": _raw(_body(max_tokens=-1)),
    "max-tokens-zero": _raw(_body(max_tokens=0)),
    "max-tokens-string": _raw(_body(max_tokens="many")),
    "max-tokens-float": _raw(_body(max_tokens=1.5)),
    "max-tokens-beyond-int64": b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":'
                               + b"9" * 40 + b"}",
    "max-tokens-1e400": b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}',
    "n-two": _raw(_body(n=2)),
    "stream-string": _raw(_body(stream="maybe")),
    "deadline-negative": _raw(_body(deadline_s=-5)),
    "deadline-nan": b'{"messages":[{"role":"user","content":"hi"}],"deadline_s":NaN}',
    "deadline-infinity": b'{"messages":[{"role":"user","content":"hi"}],"deadline_s":Infinity}',
    "temperature-nan": b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
    "temperature-infinity": b'{"messages":[{"role":"user","content":"hi"}],"temperature":-Infinity}',
    "metadata-nan": b'{"messages":[{"role":"user","content":"hi"}],"metadata":{"a":NaN}}',
    "metadata-list": _raw(_body(metadata=[1, 2])),
    "max-cost-negative": _raw(_body(max_cost_usd=-1)),
    "max-cost-nan": _raw(_body(max_cost_usd="NaN")),
    "callback-not-http": _raw(_body(callback_url="file:///etc/passwd")),
    "callback-javascript": _raw(_body(callback_url="javascript:alert(1)")),
    # issue 16: loose types OpenAI refuses, URLs Python's parser raises on, ports not allowed
    "deadline-true": _raw(_body(deadline_s=True)),
    "deadline-string": _raw(_body(deadline_s="10")),
    "max-tokens-numeric-string": _raw(_body(max_tokens="10")),
    "max-tokens-true": _raw(_body(max_tokens=True)),
    "max-completion-tokens-string": _raw(_body(max_completion_tokens="10")),
    "stream-yes": _raw(_body(stream="yes")),
    "stream-one": _raw(_body(stream=1)),
    "n-string": _raw(_body(n="1")),
    "max-cost-infinity": _raw(_body(max_cost_usd="Infinity")),
    "max-cost-true": _raw(_body(max_cost_usd=True)),
    "callback-bad-ipv6": _raw(_body(callback_url="http://[::1")),
    "callback-port-too-big": _raw(_body(callback_url="http://localhost:99999/x")),
    "callback-port-not-number": _raw(_body(callback_url="http://localhost:abc/x")),
    "callback-port-zero": _raw(_body(callback_url="http://localhost:0/x")),
    "callback-port-not-allowed": _raw(_body(callback_url="http://localhost:6379/x")),
    "callback-space": _raw(_body(callback_url="http://localhost/a b")),
    # deep nesting
    "deep-array-content": b'{"messages":[{"role":"user","content":' + _deep_array(DEEP).encode()
                          + b"}]}",
    "deep-array-metadata": b'{"messages":[{"role":"user","content":"hi"}],"metadata":{"a":'
                           + _deep_array(DEEP).encode() + b"}}",
    "deep-object-passthrough": b'{"messages":[{"role":"user","content":"hi"}],"logit_bias":'
                               + _deep_object(DEEP).encode() + b"}",
    "medium-array-metadata": b'{"messages":[{"role":"user","content":"hi"}],"metadata":{"a":'
                             + _deep_array(300).encode() + b"}}",
    "medium-array-passthrough": b'{"messages":[{"role":"user","content":"hi"}],"logit_bias":'
                                + _deep_array(300).encode() + b"}",
    "medium-array-content-part": b'{"messages":[{"role":"user","content":[{"type":"text",'
                                 b'"text":"x","extra":' + _deep_array(300).encode() + b"}]}]}",
    "medium-array-tool-calls": b'{"messages":[{"role":"user","content":"hi","tool_calls":'
                               + _deep_array(300).encode() + b"}]}",
    # unicode edges
    "lone-high-surrogate-content": b'{"messages":[{"role":"user","content":"\\ud800"}]}',
    "lone-low-surrogate-content": b'{"messages":[{"role":"user","content":"a\\udc00b"}]}',
    "lone-surrogate-text-part": b'{"messages":[{"role":"user","content":[{"type":"text",'
                                b'"text":"\\ud83d"}]}]}',
    "lone-surrogate-model": b'{"messages":[{"role":"user","content":"hi"}],"model":"\\udfff"}',
    "lone-surrogate-user": b'{"messages":[{"role":"user","content":"hi"}],"user":"\\ud800"}',
    "lone-surrogate-name": b'{"messages":[{"role":"user","content":"hi","name":"\\ud800"}]}',
    "lone-surrogate-metadata-value": b'{"messages":[{"role":"user","content":"hi"}],'
                                     b'"metadata":{"a":"\\udc00"}}',
    "lone-surrogate-metadata-key": b'{"messages":[{"role":"user","content":"hi"}],'
                                   b'"metadata":{"\\udc00":1}}',
    "lone-surrogate-tool-calls-key": b'{"messages":[{"role":"user","content":"hi",'
                                     b'"tool_calls":[{"\\udc00":1}]}]}',
    "lone-surrogate-stop": b'{"messages":[{"role":"user","content":"hi"}],"stop":["\\udc00"]}',
    "overlong-utf8-slash": b'{"messages":[{"role":"user","content":"\xc0\xaf"}]}',
    "overlong-utf8-nul": b'{"messages":[{"role":"user","content":"\xc0\x80"}]}',
    "invalid-utf8-byte": b'{"messages":[{"role":"user","content":"\xff\xfe"}]}',
    "utf16-body": '{"messages":[{"role":"user","content":"hi"}],"priority":1}'.encode("utf-16"),
    "bom-then-garbage": b"\xef\xbb\xbfnot json",
    # injection-shaped keys
    "idem-glob-star": _raw(_body(idempotency_key="*")),
    "idem-glob-chars": _raw(_body(idempotency_key="a?b[c]*")),
    "idem-path-traversal": _raw(_body(idempotency_key="../../etc/passwd")),
    "idem-crlf": _raw(_body(idempotency_key="a\r\nSet-Cookie: x=1")),
    "idem-space": _raw(_body(idempotency_key="a b")),
    "idem-colon-prefix-escape": _raw(_body(idempotency_key="x}:req:{y\x00")),
    "idem-too-long": _raw(_body(idempotency_key="k" * 201)),
    "idem-number": _raw(_body(idempotency_key=12)),
    # sizes
    "too-many-messages": _raw({"messages": [_msg("x")] * 10_001}),
    "too-large": _raw({"messages": [_msg("x" * (1100 * 1024))]}),
}

# Bodies of the Responses API and embeddings (`input` instead of `messages`), per endpoint: sent
# to its drop-in and to POST /v1/requests with `endpoint`.
_ITEM = {"role": "user", "content": "hi"}
HOSTILE_INPUT_BODIES: dict[str, dict[str, bytes]] = {
    "/v1/responses": {
        "input-missing": _raw({"model": "gpt-4o-mini"}),
        "input-null": _raw({"input": None}),
        "input-empty-string": _raw({"input": ""}),
        "input-empty-list": _raw({"input": []}),
        "input-number": _raw({"input": 5}),
        "input-object": _raw({"input": _ITEM}),
        "input-items-not-objects": _raw({"input": [_ITEM, "hi", 1]}),
        "messages-instead": _raw({"messages": [_msg()]}),
        "messages-and-input": _raw({"messages": [_msg()], "input": "hi"}),
        "max-output-tokens-zero": _raw({"input": "hi", "max_output_tokens": 0}),
        "max-output-tokens-string": _raw({"input": "hi", "max_output_tokens": "9"}),
        "max-output-tokens-float": _raw({"input": "hi", "max_output_tokens": 9.5}),
        "stream-string": _raw({"input": "hi", "stream": "yes"}),
        "lone-surrogate-input": b'{"input":"\\ud800"}',
        "lone-surrogate-item": b'{"input":[{"role":"user","content":"a\\udc00"}]}',
        "deep-input": b'{"input":[{"role":"user","content":' + _deep_array(DEEP).encode()
                      + b"}]}",
        "medium-input": b'{"input":[{"role":"user","content":"x","extra":'
                        + _deep_array(300).encode() + b"}]}",
        "nan-temperature": b'{"input":"hi","temperature":NaN}',
        "wrong-endpoint": _raw({"input": "hi", "endpoint": "/v1/embeddings"}),
        "too-large": _raw({"input": "x" * (1100 * 1024)}),
    },
    "/v1/embeddings": {
        "input-missing": _raw({"model": "text-embedding-3-small"}),
        "input-empty-string": _raw({"input": ""}),
        "input-empty-list": _raw({"input": []}),
        "input-number": _raw({"input": 5}),
        "input-empty-item": _raw({"input": ["a", ""]}),
        "input-mixed": _raw({"input": ["a", 1]}),
        "input-floats": _raw({"input": [1.5, 2.5]}),
        "input-negative-token": _raw({"input": [-1, 2]}),
        "input-bool-tokens": _raw({"input": [True, False]}),
        "input-empty-token-list": _raw({"input": [[]]}),
        "input-objects": _raw({"input": [_ITEM]}),
        "input-too-many": _raw({"input": ["x"] * 2049}),
        "messages-instead": _raw({"messages": [_msg()]}),
        "stream-true": _raw({"input": "hi", "stream": True}),
        "dimensions-zero": _raw({"input": "hi", "dimensions": 0}),
        "dimensions-string": _raw({"input": "hi", "dimensions": "8"}),
        "dimensions-huge": _raw({"input": "hi", "dimensions": 10**12}),
        "encoding-unknown": _raw({"input": "hi", "encoding_format": "int8"}),
        "lone-surrogate-input": b'{"input":["\\ud800"]}',
        "deep-input": b'{"input":' + _deep_array(DEEP).encode() + b"}",
        "wrong-endpoint": _raw({"input": "hi", "endpoint": "/v1/responses"}),
    },
}
HOSTILE_INPUT_CASES = [(endpoint, path, case)
                       for endpoint, cases in HOSTILE_INPUT_BODIES.items()
                       for path in (endpoint, "/v1/requests") for case in sorted(cases)
                       if not (path == "/v1/requests" and case == "wrong-endpoint")]


def _with_endpoint(body: bytes, endpoint: str) -> bytes:
    """`body` for POST /v1/requests: its endpoint named first, the rest byte for byte."""
    return body.replace(b"{", b'{"endpoint":"' + endpoint.encode() + b'",', 1)


BAD_IDS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2f",
    "*",
    "%3F",
    "a%3Fb%2A",
    "[a-f]*",
    "0123456789abcdef0123456789abcde*",
    "0123456789abcdef0123456789abcde?",
    "%00",
    "%0d%0aSet-Cookie:%20evil=1",
    "%ff%fe",
    "%ZZ",
    "x" * 4000,
    REAL_ID.upper(),
    REAL_ID + "0",
    "\u00e9" * 32,
]


# --- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ROUTES_WITH_BODY)
@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_clear_4xx_and_queue_nothing(api: HostileApi, path: str,
                                                          case: str) -> None:
    before = api.keyspace()
    response = httpx.post(f"{api.url}{path}", content=HOSTILE_BODIES[case],
                          headers={**auth(), "content-type": "application/json"}, timeout=30)
    assert_clear_4xx(response, f"POST {path} {case}")
    assert api.keyspace() == before, f"POST {path} {case} changed Redis"


@pytest.mark.parametrize(("endpoint", "path", "case"), HOSTILE_INPUT_CASES,
                         ids=[f"{p}-{e.rsplit('/', 1)[1]}-{c}" for e, p, c in HOSTILE_INPUT_CASES])
def test_hostile_responses_and_embeddings_bodies_get_a_clear_4xx(
        api: HostileApi, endpoint: str, path: str, case: str) -> None:
    body = HOSTILE_INPUT_BODIES[endpoint][case]
    if path == "/v1/requests":
        body = _with_endpoint(body, endpoint)
    before = api.keyspace()
    response = httpx.post(f"{api.url}{path}", content=body,
                          headers={**auth(), "content-type": "application/json"}, timeout=30)
    assert_clear_4xx(response, f"POST {path} {endpoint} {case}")
    assert api.keyspace() == before, f"POST {path} {endpoint} {case} changed Redis"


@pytest.mark.parametrize("body", [
    {"endpoint": "/v1/completions", "prompt": "hi"},
    {"endpoint": 5, "input": "hi"},
    {"endpoint": "/v1/responses/../chat/completions", "input": "hi"},
    {"endpoint": "/v1/responses", "messages": [_msg()]},
    {"endpoint": "/v1/chat/completions", "input": "hi"},
], ids=["unknown", "number", "traversal", "responses-with-messages", "chat-with-input"])
def test_an_unknown_or_mismatched_endpoint_is_a_400(api: HostileApi, body: dict[str, Any]
                                                    ) -> None:
    before = api.keyspace()
    for path in ("/v1/requests", "/v1/chat/completions"):
        response = httpx.post(f"{api.url}{path}", json=body, headers=auth(), timeout=10)
        assert response.status_code == 400, f"{path} {body}: {response.text[:300]}"
        assert "endpoint" in response.text or "input" in response.text \
            or "messages" in response.text
    assert api.keyspace() == before


@pytest.mark.parametrize("response_id", [*BAD_IDS, "resp_" + "x" * 5000, "resp_*", "resp_%00",
                                         "resp_..%2F..%2F"])
def test_hostile_response_ids_answer_404(api: HostileApi, response_id: str) -> None:
    before = api.keyspace()
    response = httpx.get(f"{api.url}/v1/responses/{response_id}", headers=auth(), timeout=10)
    assert_clear_4xx(response, f"GET /v1/responses/{response_id[:80]}")
    assert response.status_code in (404, 414), response.text[:200]
    assert api.keyspace() == before


@pytest.mark.parametrize(("header", "value"), [
    ("Idempotency-Key", "*"),
    ("Idempotency-Key", "a?b[c]"),
    ("Idempotency-Key", "../../etc/passwd"),
    ("Idempotency-Key", "k" * 201),
    ("Idempotency-Key", "caf\u00e9"),
    ("X-Priority", "urgent"),
    ("X-Priority", "high*"),
    ("X-Priority", "h" * 5000),
    ("X-Priority", "low"),
])
def test_hostile_chat_headers_get_a_clear_4xx(api: HostileApi, header: str, value: str) -> None:
    """The drop-in reads these headers itself; once a bad Idempotency-Key there was a 500."""
    before = api.keyspace()
    response = httpx.post(f"{api.url}/v1/chat/completions", content=_raw(_body()),
                          headers=[(b"Authorization", f"Bearer {KEY_A}".encode()),
                                   (b"Content-Type", b"application/json"),
                                   (header.encode(), value.encode("utf-8"))], timeout=10)
    assert_clear_4xx(response, f"chat with {header}: {value[:40]!r}")
    assert response.json()["error"]["param"] in (header, "priority"), response.text
    assert api.keyspace() == before


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xx",
    "application/json; charset=utf-16", "application/xml", "",
])
def test_wrong_content_types_are_refused(api: HostileApi, content_type: str) -> None:
    before = api.keyspace()
    for path in ROUTES_WITH_BODY:
        response = httpx.post(f"{api.url}{path}", content=b"--xx\r\nmessages=hi\r\n--xx--",
                              headers={**auth(), "content-type": content_type}, timeout=10)
        assert_clear_4xx(response, f"POST {path} as {content_type!r}")
    assert api.keyspace() == before


def documented(api: HostileApi, template: str) -> bool:
    """Whether the route exists yet (lanes land progressively); absent routes must 404."""
    return template in api.paths


@pytest.mark.parametrize("request_id", BAD_IDS)
def test_hostile_ids_answer_404_on_every_id_route(api: HostileApi, request_id: str) -> None:
    before = api.keyspace()
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        url = f"{api.url}/v1/requests/{request_id}{suffix}"
        response = httpx.request(method, url, headers=auth(), timeout=10)
        assert_clear_4xx(response, f"{method} {url[:120]}")
        assert response.status_code in (404, 405), f"{method} {url[:120]}: {response.status_code}"
        assert "set-cookie" not in response.headers, "CRLF in an id reached a response header"
    assert api.keyspace() == before


def test_unknown_well_formed_id_answers_404(api: HostileApi) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
        response = httpx.request(method, f"{api.url}/v1/requests/{REAL_ID}{suffix}",
                                 headers=auth(), timeout=10)
        assert response.status_code == 404, f"{method} {suffix}: {response.text[:200]}"


@pytest.mark.parametrize("position", [b"abc", b"-5", b"1e9", b"9" * 400, b"0-1", b"1;2",
                                      b"\xc3\xa9", b"\xff", b"%0d%0a"])
def test_hostile_resume_positions_on_events(api: HostileApi, position: bytes) -> None:
    for target, header in ((b"?after=" + position, b""), (b"", b"Last-Event-ID: " + position)):
        status, head = raw_http(api.url, (
            b"GET /v1/requests/" + REAL_ID.encode() + b"/events" + target + b" HTTP/1.1\r\n"
            b"Host: x\r\nAuthorization: Bearer " + KEY_A.encode() + b"\r\n"
            + (header + b"\r\n" if header else b"") + b"Connection: close\r\n\r\n"))
        assert status == 0 or 400 <= status < 500, f"{position!r}: {head[:300]!r}"


@pytest.mark.parametrize("authorization", [
    None, b"", b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"bearer sk-wrong",
    b"Bearer " + b"k" * 60_000, b"Bearer sk-hostile-alpha\xc3\xa9", b"Bearer \xff\xfe",
    b"Bearer *", b"Bearer sk-hostile-alph?", b"Bearer sk-hostile-alpha\x00",
], ids=lambda v: repr(v)[:40])
def test_bad_credentials_answer_401_everywhere(api: HostileApi, authorization: bytes | None
                                              ) -> None:
    before = api.keyspace()
    good = _raw(_body())
    checks = [
        (b"POST", "/v1/requests", "/v1/requests", good),
        (b"POST", "/v1/chat/completions", "/v1/chat/completions", good),
        (b"GET", f"/v1/requests/{REAL_ID}", "/v1/requests/{request_id}", b""),
        (b"DELETE", f"/v1/requests/{REAL_ID}", "/v1/requests/{request_id}", b""),
        (b"GET", f"/v1/requests/{REAL_ID}/events", "/v1/requests/{request_id}/events", b""),
    ]
    header = b"" if authorization is None else b"Authorization: " + authorization + b"\r\n"
    for method, path, template, body in checks:
        status, head = raw_http(api.url, (
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + header
            + b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body))
        # 400 is uvicorn refusing the header line itself (e.g. a NUL byte), before the app.
        expected = (400, 401, 431, 0) if documented(api, template) else (400, 404, 405, 431, 0)
        assert status in expected, f"{method!r} {path}: {head[:300]!r}"
    assert api.keyspace() == before


def _hostile_calls(api: HostileApi, key: str) -> int:
    """Every operation of the OpenAPI document, with hostile path parameters and bodies."""
    tried = 0
    for path, operations in api.paths.items():
        for method in operations:
            if method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                continue
            concrete = path
            for part in path.split("/"):
                if part.startswith("{") and part.endswith("}"):
                    concrete = concrete.replace(part, "..%2F*%3F[x]")
            for body in (b"{", _deep_array(DEEP).encode(), b'{"a":"\\ud800"}', b"[]",
                         b'{"flush_interval_s": NaN}', b'{"flush_interval_s": 1e400}',
                         HOSTILE_BODIES["medium-array-metadata"]):
                response = httpx.request(method.upper(), f"{api.url}{concrete}", content=body,
                                         headers={**auth(key), "content-type": "application/json"},
                                         timeout=10)
                tried += 1
                assert response.status_code < 500, (
                    f"{method.upper()} {concrete}: {response.status_code} {response.text[:300]}"
                )
    return tried


def test_every_documented_route_refuses_hostile_input(api: HostileApi) -> None:
    before = api.keyspace()
    assert _hostile_calls(api, KEY_A) > 0
    assert api.keyspace() == before


def test_admin_routes_refuse_hostile_input_from_an_admin(api: HostileApi) -> None:
    """As an admin tenant, so the admin routes' own validation is reached (an on-demand flush
    may be queued: that is the route's job, so Redis is not compared here)."""
    assert any(p.startswith("/v1/admin") for p in api.paths)
    assert _hostile_calls(api, KEY_ADMIN) > 0
    config = httpx.get(f"{api.url}/v1/admin/config", headers=auth(KEY_ADMIN), timeout=10)
    assert config.status_code == 200
    assert config.json()["flush_interval_s"] == api.settings.flush_interval_s


# --- raw HTTP: things httpx refuses to send ---------------------------------------------------

def raw_http(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send `request` bytes as is; return the status code (0 if the server just closed)."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1."):
        return 0, data
    return int(data.split(b" ", 2)[1]), data


def _post_bytes(path: str, body: bytes, extra_headers: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra_headers + b"Connection: close\r\n\r\n" + body
    )


def test_crlf_and_header_injection_is_not_reflected(api: HostileApi) -> None:
    before = api.keyspace()
    body = _raw({"messages": []})
    status, head = raw_http(api.url, _post_bytes(
        "/v1/requests", body, b"X-Priority: high\rSet-Cookie: evil=1\r\nX-Request-Id: a\nb\r\n"))
    assert status == 0 or 400 <= status < 500, head[:300]
    assert b"evil" not in head.split(b"\r\n\r\n")[0]
    status, head = raw_http(api.url, (
        b"GET /v1/requests/" + REAL_ID.encode() + b"%0d%0aLocation:%20http://evil HTTP/1.1\r\n"
        b"Host: localhost\r\nAuthorization: Bearer " + KEY_A.encode() + b"\r\n"
        b"Connection: close\r\n\r\n"))
    assert status == 404, head[:300]
    assert b"Location" not in head.split(b"\r\n\r\n")[0]
    assert api.keyspace() == before


def test_huge_headers_are_refused_or_ignored_without_a_500(api: HostileApi) -> None:
    before = api.keyspace()
    body = _raw({"messages": []})  # invalid: even if the headers pass, nothing may be queued
    for header in (b"X-Priority: " + b"h" * 65_536 + b"\r\n",
                   b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(64)),
                   b"Idempotency-Key: " + b"*" * 65_536 + b"\r\n"):
        status, head = raw_http(api.url, _post_bytes("/v1/requests", body, header))
        assert status == 0 or 400 <= status < 500, head[:300]
    assert api.keyspace() == before


def test_content_length_lies_and_chunked_bombs(api: HostileApi) -> None:
    before = api.keyspace()
    limit = api.settings.max_body_bytes
    status, head = raw_http(api.url, (
        b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(limit * 100).encode() + b"\r\nConnection: close\r\n\r\n{"))
    assert status == 413, head[:300]
    status, head = raw_http(api.url, (
        b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: -1\r\nConnection: close"
        b"\r\n\r\n{}"))
    assert status == 0 or 400 <= status < 500, head[:300]
    chunk = b"x" * 65_536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 2))
    status, head = raw_http(api.url, (
        b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close"
        b"\r\n\r\n" + chunks + b"0\r\n\r\n"))
    assert status == 413, head[:300]
    assert api.keyspace() == before


@pytest.mark.parametrize("budget", ["1e999999", 1e308, "123456789012345678901234567890",
                                    "1e999999999999"])
def test_absurd_budgets_are_accepted_with_a_bounded_cap(api: HostileApi,
                                                       budget: str | float) -> None:
    """A budget too big to matter is no limit, not an overflow (once: a 500)."""
    response = httpx.post(f"{api.url}/v1/requests", headers=auth(), timeout=10,
                          json={"messages": [_msg("budget")], "priority": "low",
                                "max_cost_usd": budget})
    assert response.status_code == 202, response.text
    record = httpx.get(f"{api.url}/v1/requests/{response.json()['id']}", headers=auth(),
                       timeout=10).json()
    assert 0 < record["body"]["max_tokens"] <= 1_000_000
    assert httpx.delete(f"{api.url}/v1/requests/{record['id']}", headers=auth(),
                        timeout=10).status_code == 200


def test_the_api_still_accepts_a_good_request_afterwards(api: HostileApi) -> None:
    """The corpus did not wedge the API: a valid low request is accepted and queued once."""
    before = api.keyspace()
    response = httpx.post(f"{api.url}/v1/requests", headers=auth(),
                          json={"messages": [_msg("fine")], "priority": "low",
                                "metadata": {"nested": [[[1]]]}, "temperature": 0.5},
                          timeout=10)
    assert response.status_code == 202, response.text
    after = api.keyspace()
    assert after != before
    pending = api.redis.lrange(f"{api.settings.key_prefix}:batch:pending:gpt-4o-mini", 0, -1)
    assert pending == [response.json()["id"].encode()]
    assert httpx.get(f"{api.url}/v1/requests/{response.json()['id']}", headers=auth(KEY_B),
                     timeout=10).status_code == 404


# --- issue 16: one tenant's input must not cost another tenant anything -----------------------

def test_a_bad_batch_line_fails_alone_and_costs_other_tenants_no_attempt(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        sim_url: str, redis_client: redis.Redis) -> None:
    """One tenant-b low request whose batch the upstream fails as a whole, flushed with 20 of
    tenant-a's: the failed batch is split until the bad line is alone, so every tenant-a request
    completes without using an attempt, and tenant-b's fails after its attempts, alone in its
    batches, with the upstream's reason (once: 4 of tenant-a's failed, 16 used an attempt)."""
    settings = make_settings(upstream_base_url=sim_url, api_keys={KEY_A: "alpha", KEY_B: "beta"},
                             flush_interval_s=0.5, poll_interval_s=0.3, batch_mode="native",
                             batch_max_attempts=3)
    stack = stack_factory(settings)
    url = stack.start_api()
    tag = uuid.uuid4().hex

    def submit(key: str, content: str) -> str:
        response = httpx.post(f"{url}/v1/requests", headers=auth(key), timeout=10, json={
            "priority": "low", "messages": [_msg(content)]})
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    innocent = [submit(KEY_A, f"innocent {i} {tag}") for i in range(10)]
    bad = submit(KEY_B, f"bad {tag} [[sim:batch=fail]]")
    innocent += [submit(KEY_A, f"innocent {i} {tag}") for i in range(10, 20)]
    stack.start_worker("batch")
    stack.start_beat()

    def get(key: str, request_id: str) -> dict[str, Any]:
        return dict(httpx.get(f"{url}/v1/requests/{request_id}", headers=auth(key),
                              timeout=10).json())

    wait_until(lambda: all(get(KEY_A, i)["status"] in ("completed", "failed", "cancelled")
                           for i in innocent) and get(KEY_B, bad)["status"] == "failed",
               90, 0.2, message="every request terminal")
    for request_id in innocent:
        record = get(KEY_A, request_id)
        assert record["status"] == "completed", record
        assert record["attempts"] == 0, record
    record = get(KEY_B, bad)
    assert record["attempts"] == settings.batch_max_attempts, record
    assert record["error"]["code"] == "simulated_validation_failure", record
    # Its batches: the first held everyone; every one charged to it held it alone.
    keys = Keys(settings.key_prefix)
    attempts_alone = 0
    for raw in redis_client.scan_iter(match=keys.batch_requests("*"), count=1000):
        members = {m.decode() for m in redis_client.smembers(raw)}
        if bad in members and len(members) == 1:
            attempts_alone += 1
    assert attempts_alone == settings.batch_max_attempts


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (name, labels) series of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_never_name_a_tenants_model_and_stay_bounded(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        sim_url: str, redis_client: redis.Redis) -> None:
    """Tenants pick model names: on /metrics and in the ledger they are counted as `other`, so
    40 requests with made-up names add no series and no ledger field and name no model (once:
    240 series and 200 ledger fields, `ft:acme-secret-...` readable without a key). The costs
    stay exact, and /metrics answers 401 without ROUTER_METRICS_TOKEN when that is set."""
    token = "scrape-" + uuid.uuid4().hex
    settings = make_settings(upstream_base_url=sim_url, api_keys={KEY_A: "alpha", KEY_B: "beta"},
                             metrics_token=token)
    stack = stack_factory(settings)
    url = stack.start_api()
    stack.start_worker("stream", concurrency=8)
    for headers in ({}, auth(KEY_A), {"Authorization": "Bearer wrong"}):
        refused = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_metrics_token"

    def scrape() -> str:
        response = httpx.get(f"{url}/metrics", timeout=10,
                             headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        return response.text

    secret = f"ft:acme-secret-{uuid.uuid4().hex[:8]}"
    streamed: list[str] = []

    def submit(model: str, priority: str) -> None:
        response = httpx.post(f"{url}/v1/requests", headers=auth(KEY_B), timeout=10, json={
            "priority": priority, "model": model, "messages": [_msg(f"hi {model}")]})
        assert response.status_code == 202, response.text
        if priority == "high":
            streamed.append(str(response.json()["id"]))

    def all_completed() -> bool:
        return all(httpx.get(f"{url}/v1/requests/{i}", headers=auth(KEY_B), timeout=10)
                   .json()["status"] == "completed" for i in streamed)

    keys = Keys(settings.key_prefix)
    # A field an older version wrote for a tenant's model is shown as `other` too.
    redis_client.hincrby(keys.ledger(), f"stream|{secret}-legacy|prompt_tokens", 7)
    for priority in ("high", "low"):  # one known and one unknown model on each lane
        submit("gpt-4o-mini", priority)
        submit(f"{secret}-0", priority)
    wait_until(all_completed, 30, 0.1, message="first streams completed")
    before, fields_before = _series(scrape()), redis_client.hlen(keys.ledger())
    for i in range(1, 21):
        submit(f"{secret}-{i}", "high")
        submit(f"{secret}-low-{i}", "low")
    wait_until(all_completed, 60, 0.1, message="every stream completed")
    text = scrape()
    assert "acme" not in text
    assert _series(text) == before
    assert redis_client.hlen(keys.ledger()) == fields_before
    assert ('hybrid_router_queue_depth{lane="batch",model="other",state="queued"} 21.0'
            in text)
    # Exact to the pico-dollar: the ledger's stream cost is the sum of the records' costs.
    from decimal import Decimal

    from hybrid_router.router.core.ledger import Ledger

    costs = [Decimal(str(httpx.get(f"{url}/v1/requests/{i}", headers=auth(KEY_B), timeout=10)
                         .json()["cost_usd"])) for i in streamed]
    ledger = Ledger.from_hash(redis_client.hgetall(keys.ledger()))
    assert ledger.total("stream").cost_usd == sum(costs) > 0
    assert ledger.total("stream").requests == len(streamed) == 22


def test_after_a_mixed_run_every_key_expires_or_is_in_the_bounded_set(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        sim_url: str, redis_client: redis.Redis) -> None:
    """Streams completed, failed and cancelled; low requests with far deadlines completed,
    failed after their attempts and cancelled in the queue; a drop-in call; an idempotent
    replay; a made-up model. Once every request is terminal, every key under the prefix has a
    TTL or is one of `bounded_keys()` (once: finished requests stayed in the deadlines index
    until their deadline, `deadline_s=1e308` for ever)."""
    settings = make_settings(upstream_base_url=sim_url, api_keys={KEY_A: "alpha"},
                             flush_interval_s=0.5, poll_interval_s=0.3, batch_mode="native",
                             batch_max_attempts=2, stream_max_retries=1,
                             retry_backoff_base_s=0.05, retry_backoff_max_s=0.1)
    stack = stack_factory(settings)
    url = stack.start_api()
    tag = uuid.uuid4().hex
    ids: list[str] = []

    def submit(content: str, priority: str, **extra: Any) -> str:
        response = httpx.post(f"{url}/v1/requests", headers=auth(), timeout=10, json={
            "priority": priority, "messages": [_msg(f"{content} {tag}")], **extra})
        assert response.status_code in (200, 202), response.text
        ids.append(str(response.json()["id"]))
        return ids[-1]

    far = {"deadline_s": 86_400.0}
    for i in range(4):
        submit(f"low {i}", "low", **far)
    submit("low failing [[sim:line_error=1]]", "low", **far)
    submit("low made-up model", "low", model=f"ft:nobody-{tag[:6]}", **far)
    submit("low idempotent", "low", idempotency_key=f"idem-{tag}", **far)
    submit("low idempotent", "low", idempotency_key=f"idem-{tag}", **far)  # the replay
    cancelled = submit("low cancelled", "low", **far)
    assert httpx.delete(f"{url}/v1/requests/{cancelled}", headers=auth(),
                        timeout=10).status_code == 200
    stack.start_worker("stream", concurrency=4)
    stack.start_worker("batch")
    stack.start_beat()
    submit("high", "high")
    submit("high failing [[sim:fail=400]]", "high")
    slow = submit("high slow [[sim:tokens=400,tps=20]]", "high")
    wait_until(lambda: httpx.get(f"{url}/v1/requests/{slow}", headers=auth(), timeout=10)
               .json()["status"] == "streaming", 15, message="slow stream running")
    assert httpx.delete(f"{url}/v1/requests/{slow}", headers=auth(),
                        timeout=10).status_code == 200
    dropin = httpx.post(f"{url}/v1/chat/completions", headers=auth(), timeout=30, json={
        "model": "gpt-4o-mini", "messages": [_msg(f"drop-in {tag}")]})
    assert dropin.status_code == 200, dropin.text

    def statuses() -> list[str]:
        return [httpx.get(f"{url}/v1/requests/{i}", headers=auth(), timeout=10).json()["status"]
                for i in ids]

    wait_until(lambda: all(s in ("completed", "failed", "cancelled") for s in statuses()),
               60, 0.2, message="every request terminal")
    assert set(statuses()) == {"completed", "failed", "cancelled"}
    keys = Keys(settings.key_prefix)
    bounded = set(bounded_keys(keys))

    def unexpired() -> list[str]:
        found = []
        for pattern in (f"{settings.key_prefix}:*", f"{settings.key_prefix}.*"):
            for raw in redis_client.scan_iter(match=pattern, count=1000):
                key = raw.decode()
                if redis_client.ttl(raw) == -1 and key not in bounded and \
                        not key.startswith(keys.celery_bindings_prefix()):
                    found.append(key)
        return found

    # In-flight bookkeeping (the last poll, the stream lease) ends a moment after the results.
    try:
        wait_until(lambda: not unexpired(), 15, 0.2, message="only bounded keys without TTL")
    except TimeoutError:
        raise AssertionError(f"keys without a TTL outside bounded_keys(): {unexpired()}") from None


def _commands_on_records(api: HostileApi, method: str, url: str, key: str,
                         ids: tuple[str, ...]) -> tuple[int, list[str]]:
    """The answer's status and the Redis commands it issued on request records (MONITOR), each
    with the ids in `ids` written as `<id>`."""
    prefix = api.settings.key_prefix
    sentinel = f"{prefix}:monitor-sentinel:{uuid.uuid4().hex}"
    watcher = redis.Redis.from_url(api.settings.redis_url, socket_timeout=10)
    try:
        with watcher.monitor() as monitor:
            status = httpx.request(method, url, headers=auth(key), timeout=10).status_code
            api.redis.exists(sentinel)
            seen: list[str] = []
            while True:
                command = str(monitor.next_command()["command"])
                if sentinel in command:
                    break
                if f"{prefix}:req:" in command:
                    for request_id in ids:
                        command = command.replace(request_id, "<id>")
                    seen.append(command)
    finally:
        watcher.close()
    return status, seen


def test_foreign_unknown_and_malformed_ids_cost_the_same_redis_commands(api: HostileApi
                                                                        ) -> None:
    """Another tenant's id, an unknown id and a malformed one are answered after the very same
    Redis commands on every id route (once: another tenant's record was read whole before the
    tenant check, twice as slow for a large record, and a malformed id read nothing); the
    owner gets the record. Timing figures: bench/bench_probe.py, docs/RELIABILITY.md."""
    from hybrid_router.router.api.routes.requests import NO_SUCH_ID

    big = "x" * 200_000
    created = httpx.post(f"{api.url}/v1/requests", headers=auth(KEY_B), timeout=10, json={
        "priority": "low", "messages": [_msg(big)], "metadata": {"pad": big}})
    assert created.status_code == 202, created.text
    foreign, unknown, malformed = created.json()["id"], uuid.uuid4().hex, "Z" * 32
    ids = (foreign, unknown, NO_SUCH_ID)
    try:
        for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
            # Warm: the first call of a script after a restart loads it (NOSCRIPT, then again).
            httpx.request(method, f"{api.url}/v1/requests/{unknown}{suffix}",
                          headers=auth(KEY_A), timeout=10)
            answers = {
                name: _commands_on_records(api, method, f"{api.url}/v1/requests/{request_id}"
                                           f"{suffix}", KEY_A, ids)
                for name, request_id in (("foreign", foreign), ("unknown", unknown),
                                         ("malformed", malformed))}
            assert answers["foreign"][0] == 404 and answers["foreign"][1], answers
            assert answers["foreign"] == answers["unknown"] == answers["malformed"], (
                method, suffix, answers)
            assert not any("HGETALL" in c.upper() for c in answers["foreign"][1]), answers
        owner = httpx.get(f"{api.url}/v1/requests/{foreign}", headers=auth(KEY_B), timeout=10)
        assert owner.status_code == 200 and owner.json()["metadata"] == {"pad": big}
    finally:
        httpx.delete(f"{api.url}/v1/requests/{foreign}", headers=auth(KEY_B), timeout=10)


def _read_until_closed(socks: list[socket.socket], seconds: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it; a socket still open after
    `seconds` is missing from the answer."""
    import selectors

    received = {sock: b"" for sock in socks}
    closed: dict[socket.socket, bytes] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _events in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[sock] += data
                else:
                    closed[sock] = received[sock]
                    selector.unregister(sock)
    return closed


def test_slow_clients_get_a_408_and_are_closed(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack]
        ) -> None:
    """Connections that never finish their headers (slowloris), a body shorter than its
    Content-Length, a chunked body that stalls, and a connection that sends nothing are all
    closed (with a 408 where a request began) once the header or body timeout passes (once:
    held for ever); meanwhile other requests are served, and a long SSE response is not cut."""
    settings = make_settings(upstream_base_url="http://127.0.0.1:9/v1",
                             api_keys={KEY_A: "alpha"}, http_header_timeout_s=1.0,
                             http_body_timeout_s=1.0, sse_keepalive_s=0.3)
    stack = stack_factory(settings)
    url = stack.start_api()
    parsed = urlparse(url)
    address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
    head = (b"POST /v1/requests HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
            + b"\r\nContent-Type: application/json\r\n")
    sends = {
        "silent": b"",
        "body short of its length": head + b"Content-Length: 100\r\n\r\n" + b'{"messages"',
        "chunked body that stalls": head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mes\r\n",
    }
    sends.update({f"slowloris {i}": head + b"X-Slow: " for i in range(100)})
    socks: dict[str, socket.socket] = {}
    started = time.monotonic()
    for name, data in sends.items():
        socks[name] = socket.create_connection(address, timeout=5)
        socks[name].sendall(data)
    # A long response (SSE, keep-alives every 0.3 s) outlives both timeouts.
    queued = httpx.post(f"{url}/v1/requests", headers=auth(), timeout=10, json={
        "priority": "low", "messages": [_msg("waits")]})
    assert queued.status_code == 202, queued.text
    with httpx.stream("GET", f"{url}/v1/requests/{queued.json()['id']}/events", headers=auth(),
                      timeout=10) as events:
        assert events.status_code == 200
        lines = events.iter_lines()
        while time.monotonic() - started < 3.0:
            next(lines)  # raises if the server closed the stream
        # Meanwhile, ordinary requests are served.
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    closed = _read_until_closed(list(socks.values()), 10.0)
    try:
        for name, sock in socks.items():
            assert sock in closed, f"{name}: still open {time.monotonic() - started:.1f} s after"
            if name != "silent" and not name.startswith("slowloris"):
                assert closed[sock].startswith(b"HTTP/1.1 408"), (name, closed[sock][:300])
                assert b'"request_timeout"' in closed[sock], (name, closed[sock][:300])
        assert closed[socks["slowloris 0"]].startswith(b"HTTP/1.1 408")
    finally:
        for sock in socks.values():
            sock.close()


# --- issue 16 ------------------------------------------------------------------------------------

def _low_request(api: HostileApi, **fields: Any) -> httpx.Response:
    return httpx.post(f"{api.url}/v1/requests", headers=auth(), timeout=10,
                      json={"messages": [_msg("issue 16")], "priority": "low", **fields})


def _cancel(api: HostileApi, request_id: str) -> None:
    assert httpx.delete(f"{api.url}/v1/requests/{request_id}", headers=auth(),
                        timeout=10).status_code == 200


def _left_and_cancelled(api: HostileApi, request_id: str) -> None:
    """Cancel a drop-in stream the test walked away from and wait until it is (the API's own
    cancel on disconnect is asynchronous, and later tests compare the keyspace)."""
    status = httpx.delete(f"{api.url}/v1/requests/{request_id}", headers=auth(),
                          timeout=10).status_code
    assert status in (200, 409), status  # 409: the disconnect had cancelled it already
    wait_until(lambda: httpx.get(f"{api.url}/v1/requests/{request_id}", headers=auth(),
                                 timeout=10).json()["status"] == "cancelled",
               10, message=f"request {request_id} cancelled")


def test_a_decimal_overflow_budget_on_the_drop_in_is_no_500(api: HostileApi) -> None:
    """``max_cost_usd: "1e999999999999"`` overflowed Decimal arithmetic (a 500) on both POST
    routes; /v1/requests is covered by the absurd-budget test. The drop-in (no stream worker
    here) starts its stream: the request was accepted; leaving cancels it."""
    with httpx.stream("POST", f"{api.url}/v1/chat/completions", headers=auth(), timeout=10,
                      json={"messages": [_msg("budget")], "stream": True,
                            "max_cost_usd": "1e999999999999"}) as response:
        assert response.status_code == 200, response.read()
        first = next(response.iter_lines())
    _left_and_cancelled(api, response.headers["x-request-id"])
    assert first.startswith("data: ") and json.loads(first[6:])["object"] == \
        "chat.completion.chunk"


def test_callback_ports_must_be_listed(api: HostileApi) -> None:
    """With ``ROUTER_CALLBACK_ALLOWED_HOSTS=["localhost"]`` only ports 80 and 443 of localhost
    may be called: ``http://localhost:6379/x`` (Redis) is refused at intake with a message
    saying how to allow it; the default ports are accepted."""
    before = api.keyspace()
    refused = _low_request(api, callback_url="http://localhost:6379/x")
    assert_clear_4xx(refused, "callback to localhost:6379")
    error = refused.json()["error"]
    assert error["param"] == "callback_url" and "6379" in error["message"]
    assert "localhost:6379" in error["message"]  # the entry that would allow it
    assert api.keyspace() == before
    for url in ("http://localhost/hook", "https://localhost/hook", "http://localhost:443/hook"):
        accepted = _low_request(api, callback_url=url)
        assert accepted.status_code == 202, (url, accepted.text)
        _cancel(api, accepted.json()["id"])


@pytest.mark.parametrize("cursor", [str(2**64), str(2**64 + 5), str(2**63), "9" * 30])
def test_resume_cursors_beyond_redis_stream_ids_are_a_400_before_any_header(
        api: HostileApi, cursor: str) -> None:
    """Once: 200 and headers, then the connection dropped (Redis ``Invalid stream ID``)."""
    accepted = _low_request(api)
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]
    try:
        for target, header in ((f"?after={cursor}", ""), ("", f"Last-Event-ID: {cursor}\r\n")):
            status, head = raw_http(api.url, (
                f"GET /v1/requests/{request_id}/events{target} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {KEY_A}\r\n{header}Connection: close\r\n\r\n"
            ).encode())
            assert status == 400, f"{target or header}: {head[:300]!r}"
            assert b"text/event-stream" not in head
        # The largest cursor that is allowed still opens the stream.
        status, head = raw_http(api.url, (
            f"GET /v1/requests/{request_id}/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {KEY_A}\r\nLast-Event-ID: {2**63 - 1}\r\n"
            "Connection: close\r\n\r\n").encode())
        assert status == 200, head[:300]
    finally:
        _cancel(api, request_id)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_the_host_header_is_never_reflected_into_urls(api: HostileApi, content_type: str) -> None:
    """``Host: evil.example`` once became ``http://evil.example/...`` in the 202's URLs (both
    the fast and the general path); they come from ``ROUTER_PUBLIC_BASE_URL``."""
    response = httpx.post(f"{api.url}/v1/requests", timeout=10,
                          headers={**auth(), "Host": "evil.example", "Content-Type": content_type},
                          content=_raw({"messages": [_msg("host")], "priority": "low"}))
    assert response.status_code == 202, response.text
    data = response.json()
    assert data["events_url"] == f"{PUBLIC_BASE_URL}/v1/requests/{data['id']}/events"
    assert data["result_url"] == f"{PUBLIC_BASE_URL}/v1/requests/{data['id']}"
    view = httpx.get(f"{api.url}/v1/requests/{data['id']}", timeout=10,
                     headers={**auth(), "Host": "evil.example"}).json()
    assert view["events_url"] == data["events_url"]
    assert "evil" not in response.text + json.dumps(view)
    _cancel(api, data["id"])


@pytest.mark.parametrize(("body", "word"), [
    (b'{"flush_interval_s": 1e-300}', "0.1"),
    (b'{"flush_interval_s": 0.05}', "0.1"),
    (b'{"flush_interval_s": NaN}', "finite"),
    (b'{"flush_interval_s": Infinity}', "finite"),
    (b'{"flush_interval_s": "5"}', "number"),
    (b'{"flush_interval_s": true}', "number"),
    (b'{"flush_interval_s": 1e9}', "604800"),
])
def test_admin_flush_interval_is_strict_and_bounded(api: HostileApi, body: bytes,
                                                    word: str) -> None:
    before = httpx.get(f"{api.url}/v1/admin/config", headers=auth(KEY_ADMIN), timeout=10).json()
    response = httpx.put(f"{api.url}/v1/admin/config", content=body, timeout=10,
                         headers={**auth(KEY_ADMIN), "content-type": "application/json"})
    assert_clear_4xx(response, body.decode())
    error = response.json()["error"]
    assert error["param"] == "flush_interval_s" and word in error["message"], error
    after = httpx.get(f"{api.url}/v1/admin/config", headers=auth(KEY_ADMIN), timeout=10).json()
    assert after == before


def _docs_verify() -> Callable[..., bool]:
    """The `verify` function of docs/RELIABILITY.md's callback snippet, run exactly as written."""
    text = (REPO_ROOT / "docs" / "RELIABILITY.md").read_text()
    block = text.split("<!-- callback-verify:start -->")[1].split("<!-- callback-verify:end -->")[0]
    code = block.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/RELIABILITY.md", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


def test_callback_signature_covers_a_timestamp_and_the_docs_snippet_verifies_it(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    """A callback delivered to a real receiver verifies with the documented snippet; the same
    capture replayed after the tolerance, with its time changed or its body changed does not."""
    verify = _docs_verify()
    settings = make_settings(callback_allowed_hosts=["127.0.0.1:*"], callback_secret="s3cret")
    with callback_receiver() as receiver, httpx.Client(trust_env=False) as http:
        request_id = submit_low(redis_client, settings, "signed callback",
                                callback_url=receiver.url("signed"))
        RequestStore(redis_client, settings).cancel(request_id, "gpt-4o-mini")
        sent_at = time.time()
        assert deliver_callback(settings, redis_client, http, request_id).outcome == "sent"
    [post] = receiver.posts
    header, body = post.signature, post.body
    assert header is not None and header.startswith("t=") and ",v1=" in header
    assert abs(int(header.split(",")[0][2:]) - sent_at) <= 5
    assert verify(header, body, "s3cret")
    assert verify_signature(header, body, "s3cret")  # the router's own check agrees
    assert not verify(header, body, "other-secret")
    assert not verify(header, body.replace(b"cancelled", b"completed"), "s3cret")
    assert not verify(header, body, "s3cret", now=sent_at + 3600)  # replayed an hour later
    t, _, digest = header.partition(",")
    restamped = f"t={int(t[2:]) + 3600},{digest}"  # a replay that claims a fresh time
    assert not verify(restamped, body, "s3cret", now=sent_at + 3600)
    assert not verify(digest, body, "s3cret")  # no timestamp at all


def test_the_drop_in_accepts_an_agent_tool_call_turn(api: HostileApi) -> None:
    """``content: null`` + ``tool_calls``, then a ``tool`` message: once a 400 blaming the
    Idempotency-Key header (the body was dumped without its nulls and validated again). No
    stream worker runs here: the stream starts (the request was accepted); leaving cancels it."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    for extra in ({}, {"Idempotency-Key": f"agent-{uuid.uuid4().hex}"}):
        with httpx.stream("POST", f"{api.url}/v1/chat/completions", timeout=10,
                          headers={**auth(), **extra},
                          json={"messages": messages, "stream": True, "tools": [{
                              "type": "function", "function": {"name": "get_weather"}}]}
                          ) as response:
            assert response.status_code == 200, response.read()
            assert next(response.iter_lines()).startswith("data: ")
            request_id = response.headers["x-request-id"]
        _left_and_cancelled(api, request_id)
        record = httpx.get(f"{api.url}/v1/requests/{request_id}", headers=auth(),
                           timeout=10).json()
        assert record["body"]["messages"] == messages  # kept as sent, nulls included
