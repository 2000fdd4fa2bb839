"""Signed, read-only stream URLs and CORS, through real HTTP against the API, a stream worker
and the simulator: the URL opens its own request's events (with resume) and nothing else; an
expired, altered or misused token is a 401 that says why; CORS answers only listed origins."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from hybrid_router.router.core.stream_url import StreamTokenError, sign, verify
from hybrid_router.settings import Settings, settings_to_env
from tests.support import Stack

KEY_A, KEY_B = "key-tenant-a-0123456789", "key-tenant-b-0123456789"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
SECRET_OLD, SECRET_NEW = "old-secret-0123456789abcdef", "new-secret-0123456789abcdef"
ORIGIN = "http://app.example.test:8080"


def make(redis_base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": f"{redis_base_url}/0",
        "key_prefix": f"t{uuid.uuid4().hex[:10]}",
        "api_keys": {KEY_A: "tenant-a", KEY_B: "tenant-b"},
        "upstream_api_key": "sk-sim",
        "log_format": "json",
        "stream_url_secrets": [SECRET_NEW, SECRET_OLD],
        "cors_origins": [ORIGIN],
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


# --- the token, pure CPU -----------------------------------------------------------------------

def test_token_round_trip_rotation_and_every_way_it_fails(redis_base_url: str) -> None:
    settings = make(redis_base_url)
    rid, other = uuid.uuid4().hex, uuid.uuid4().hex
    token = sign(settings, rid, "tenant-a")
    assert token is not None
    grant = verify(settings, rid, token)
    assert (grant.request_id, grant.tenant) == (rid, "tenant-a")
    assert grant.expires_at - time.time() == pytest.approx(settings.stream_url_ttl_s, abs=2)

    # Rotation: signed with the old secret (first then), still verified while it is listed.
    old_first = make(redis_base_url, stream_url_secrets=[SECRET_OLD])
    old_token = sign(old_first, rid, "tenant-a")
    assert old_token is not None
    assert verify(settings, rid, old_token).tenant == "tenant-a"
    dropped = make(redis_base_url, stream_url_secrets=[SECRET_NEW])
    with pytest.raises(StreamTokenError, match="altered"):
        verify(dropped, rid, old_token)

    def code_of(req_id: str, tok: str, now: float | None = None) -> str:
        with pytest.raises(StreamTokenError) as info:
            verify(settings, req_id, tok, now)
        return info.value.code

    tenant_b64, expiry, mac = token.split(".")
    assert code_of(other, token) == "invalid_stream_token"                      # another id
    assert code_of(rid, f"{tenant_b64}.{int(expiry) + 3600}.{mac}") == "invalid_stream_token"
    b_tenant = sign(settings, rid, "tenant-b")
    assert b_tenant is not None
    assert code_of(rid, f"{b_tenant.split('.')[0]}.{expiry}.{mac}") == "invalid_stream_token"
    assert code_of(rid, token, now=int(expiry) + 1) == "stream_token_expired"
    for junk in ("", "abc", "a.b.c", "a.b", "!!!.1.x"):
        assert code_of(rid, junk) == "invalid_stream_token"
    assert sign(make(redis_base_url, stream_url_secrets=[]), rid, "t") is None


def test_bad_settings_are_refused_and_secrets_never_shown(redis_base_url: str) -> None:
    settings = make(redis_base_url)
    assert SECRET_NEW not in str(settings.safe_dump()) and SECRET_NEW not in repr(settings)
    assert settings_to_env(settings)["ROUTER_STREAM_URL_SECRETS"] == (
        f'["{SECRET_NEW}", "{SECRET_OLD}"]')  # what a child process gets (`up`, tests)
    with pytest.raises(ValueError, match="at least 16"):
        make(redis_base_url, stream_url_secrets=["short"])
    with pytest.raises(ValueError, match="not an origin"):
        make(redis_base_url, cors_origins=["app.example.com"])
    with pytest.raises(ValueError, match="cannot be used with cors_origins"):
        make(redis_base_url, cors_origins=["*"], cors_allow_credentials=True)


# --- through the running API --------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(redis_base_url: str, sim_url: str) -> Iterator[tuple[str, Settings]]:
    settings = make(redis_base_url, upstream_base_url=sim_url, stream_url_ttl_s=30)
    with Stack(settings) as stack:
        url = stack.start_api()
        stack.start_worker("stream")
        yield url, settings


def sse_events(response: httpx.Response) -> list[tuple[int, str]]:
    out, seq = [], 0
    for line in response.iter_lines():
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            out.append((seq, line[7:]))
    return out


def submit(url: str, headers: dict[str, str] = A) -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/requests", headers=headers, timeout=10, json={
        "messages": [{"role": "user", "content": "hi [[sim:tokens=8]]"}], "priority": "high"})
    assert resp.status_code == 202, resp.text
    data: dict[str, Any] = resp.json()
    return data


def test_the_stream_url_opens_its_events_with_resume_and_nothing_else(
    api: tuple[str, Settings],
) -> None:
    url, _ = api
    data = submit(url)
    # Relative to the router (no ROUTER_PUBLIC_BASE_URL here: never built from a Host header).
    assert data["stream_url"].startswith(f"/v1/requests/{data['id']}/events?token=")
    stream = url + data["stream_url"]
    with httpx.stream("GET", stream, timeout=20) as resp:
        assert resp.status_code == 200, resp.read()
        events = sse_events(resp)
    assert events[0] == (1, "accepted") and events[-1][1] == "done"
    assert [s for s, _ in events] == list(range(1, len(events) + 1))
    # Resume: Last-Event-ID (what EventSource sends on reconnect), and ?after= with the token.
    with httpx.stream("GET", stream, headers={"Last-Event-ID": "3"}, timeout=20) as resp:
        assert [s for s, _ in sse_events(resp)] == [s for s, _ in events if s > 3]
    with httpx.stream("GET", f"{stream}&after=4", timeout=20) as resp:
        assert [s for s, _ in sse_events(resp)] == [s for s, _ in events if s > 4]

    token = parse_qs(urlparse(stream).query)["token"][0]
    # Nothing else: not the record, not cancel (the token is no key), not another request.
    assert httpx.get(f"{url}/v1/requests/{data['id']}?token={token}").status_code == 401
    assert httpx.delete(f"{url}/v1/requests/{data['id']}?token={token}").status_code == 401
    assert httpx.get(f"{url}/v1/requests/{data['id']}",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 401
    other = submit(url)
    resp = httpx.get(f"{url}/v1/requests/{other['id']}/events?token={token}")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_stream_token"
    assert "another request" in resp.json()["error"]["message"]
    # The record gives a fresh URL, for its owner only.
    view = httpx.get(f"{url}/v1/requests/{data['id']}", headers=A).json()
    assert view["stream_url"].startswith(f"/v1/requests/{data['id']}/events?token=")
    assert httpx.get(f"{url}/v1/requests/{data['id']}", headers=B).status_code == 404


def test_expired_and_altered_tokens_are_401_with_a_clear_message(
    api: tuple[str, Settings],
) -> None:
    url, settings = api
    data = submit(url)
    rid = data["id"]
    expired = sign(settings, rid, "tenant-a", now=time.time() - settings.stream_url_ttl_s - 1)
    resp = httpx.get(f"{url}/v1/requests/{rid}/events?token={expired}")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "stream_token_expired"
    assert "expired" in resp.json()["error"]["message"]

    token = parse_qs(urlparse(data["stream_url"]).query)["token"][0]
    tenant_b64, expiry, mac = token.split(".")
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for bad in (f"{tenant_b64}.{expiry}.{flipped}", f"{tenant_b64}.{int(expiry) + 60}.{mac}",
                "not-a-token"):
        for extra in ("", "&after=1"):  # the fast path and the general one answer alike
            resp = httpx.get(f"{url}/v1/requests/{rid}/events?token={bad}{extra}")
            assert resp.status_code == 401, (bad, extra)
            assert resp.json()["error"]["code"] == "invalid_stream_token"
            assert resp.json()["error"]["param"] == "token"
    # A token signed for tenant-b cannot open tenant-a's request (404 as for a foreign id).
    foreign = sign(settings, rid, "tenant-b")
    assert httpx.get(f"{url}/v1/requests/{rid}/events?token={foreign}").status_code == 404


def test_cors_answers_listed_origins_only(api: tuple[str, Settings]) -> None:
    url, _ = api
    data = submit(url)
    preflight = httpx.options(f"{url}/v1/requests", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers

    with httpx.stream("GET", url + data["stream_url"], headers={"Origin": ORIGIN},
                      timeout=20) as resp:
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == ORIGIN
        resp.read()
    denied = httpx.options(f"{url}/v1/requests", headers={
        "Origin": "http://evil.example.test", "Access-Control-Request-Method": "POST"})
    assert denied.status_code == 400
    assert "access-control-allow-origin" not in denied.headers
    plain = httpx.get(url + data["stream_url"].replace("/events?", "/nope?"),
                      headers={"Origin": "http://evil.example.test"})
    assert "access-control-allow-origin" not in plain.headers


def test_stream_url_is_absolute_under_the_public_base_url(redis_base_url: str) -> None:
    settings = make(redis_base_url, public_base_url="https://router.example.test/base")
    with Stack(settings) as stack:
        url = stack.start_api()
        resp = httpx.post(f"{url}/v1/requests", headers=A, json={
            "messages": [{"role": "user", "content": "hi"}], "priority": "low"})
        assert resp.status_code == 202
        rid = resp.json()["id"]
        assert resp.json()["stream_url"].startswith(
            f"https://router.example.test/base/v1/requests/{rid}/events?token=")


def test_no_cors_headers_and_no_stream_url_by_default(redis_base_url: str, sim_url: str) -> None:
    settings = make(redis_base_url, upstream_base_url=sim_url, stream_url_secrets=[],
                    cors_origins=[])
    with Stack(settings) as stack:
        url = stack.start_api()
        resp = httpx.post(f"{url}/v1/requests", headers={**A, "Origin": ORIGIN}, json={
            "messages": [{"role": "user", "content": "hi"}], "priority": "low"})
        assert resp.status_code == 202
        assert resp.json()["stream_url"] is None
        assert "access-control-allow-origin" not in resp.headers
        preflight = httpx.options(f"{url}/v1/requests", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        rid = resp.json()["id"]
        off = httpx.get(f"{url}/v1/requests/{rid}/events?token=a.1.b")
        assert off.status_code == 401
        assert off.json()["error"]["code"] == "stream_urls_off"
