"""Tenant isolation: one tenant can never read, stream, cancel or even detect another's requests.

Tenant A's requests are live (a slow stream on a real stream worker, a queued low request) while
tenant B uses A's ids on every route. Each answer must be the very 404 an unknown id gets (the
body differs only by the id echoed in it), so an id cannot be probed; A's requests carry on
untouched; idempotency keys are per tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from hybrid_router.settings import Settings
from tests.support import Stack, wait_until

KEY_A = "sk-tenant-alpha"
KEY_B = "sk-tenant-beta"


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def normalized(response: httpx.Response, request_id: str) -> tuple[int, Any, str]:
    """Status, body with the echoed id replaced, and content type: what a prober could compare."""
    text = response.text.replace(request_id, "<id>")
    return response.status_code, text, response.headers.get("content-type", "")


@pytest.fixture
def tenants_stack(make_settings: Callable[..., Settings], sim_url: str,
                  stack_factory: Callable[[Settings], Stack]) -> tuple[str, Settings]:
    settings = make_settings(upstream_base_url=sim_url, api_keys={KEY_A: "alpha", KEY_B: "beta"},
                             sse_keepalive_s=0.5)
    stack = stack_factory(settings)
    url = stack.start_api()
    stack.start_worker("stream", concurrency=4)
    return url, settings


def test_another_tenant_cannot_read_stream_cancel_or_probe(tenants_stack: tuple[str, Settings]
                                                           ) -> None:
    url, _settings = tenants_stack
    marker = uuid.uuid4().hex
    slow = httpx.post(f"{url}/v1/requests", headers=headers(KEY_A), timeout=10, json={
        "priority": "high",
        "messages": [{"role": "user", "content": f"{marker} [[sim:tokens=120,tps=40]]"}],
    })
    low = httpx.post(f"{url}/v1/requests", headers=headers(KEY_A), timeout=10, json={
        "priority": "low", "messages": [{"role": "user", "content": f"low {marker}"}],
    })
    assert slow.status_code == 202 and low.status_code == 202
    slow_id, low_id = slow.json()["id"], low.json()["id"]
    wait_until(lambda: httpx.get(f"{url}/v1/requests/{slow_id}", headers=headers(KEY_A))
               .json()["status"] == "streaming", 15, message="A's stream running")

    unknown = uuid.uuid4().hex
    for foreign in (slow_id, low_id):
        for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
            as_b = httpx.request(method, f"{url}/v1/requests/{foreign}{suffix}",
                                 headers=headers(KEY_B), timeout=10)
            as_unknown = httpx.request(method, f"{url}/v1/requests/{unknown}{suffix}",
                                       headers=headers(KEY_B), timeout=10)
            assert as_b.status_code == 404, f"B {method} {suffix}: {as_b.status_code}"
            assert normalized(as_b, foreign) == normalized(as_unknown, unknown), (
                f"{method} {suffix}: a foreign id answers differently from an unknown one"
            )
            assert marker not in as_b.text
        with httpx.stream("GET", f"{url}/v1/requests/{foreign}/events", timeout=10,
                          headers={**headers(KEY_B), "Last-Event-ID": "0"}) as events:
            assert events.status_code == 404
            assert marker not in events.read().decode()

    stats = httpx.get(f"{url}/v1/stats", headers=headers(KEY_B), timeout=10)
    assert stats.status_code in (200, 403), stats.text  # 403: stats are for admin tenants
    assert slow_id not in stats.text and marker not in stats.text and "alpha" not in stats.text

    # A's requests are untouched: the stream completes, the low one is still queued.
    final = wait_until(lambda: (r := httpx.get(f"{url}/v1/requests/{slow_id}",
                                               headers=headers(KEY_A)).json())["status"]
                       in ("completed", "failed", "cancelled") and r, 30,
                       message="A's stream finished")
    assert final["status"] == "completed", final
    low_view = httpx.get(f"{url}/v1/requests/{low_id}", headers=headers(KEY_A)).json()
    assert low_view["status"] == "queued"
    with httpx.stream("GET", f"{url}/v1/requests/{slow_id}/events", headers=headers(KEY_A),
                      timeout=10) as own:
        assert own.status_code == 200
        body = own.read().decode()
    assert "event: done" in body, "the owner still streams its own events"


def test_idempotency_keys_are_per_tenant(tenants_stack: tuple[str, Settings]) -> None:
    url, _settings = tenants_stack
    body = {"priority": "low", "idempotency_key": "shared-key-1",
            "messages": [{"role": "user", "content": "same body"}]}
    first_a = httpx.post(f"{url}/v1/requests", headers=headers(KEY_A), json=body, timeout=10)
    again_a = httpx.post(f"{url}/v1/requests", headers=headers(KEY_A), json=body, timeout=10)
    first_b = httpx.post(f"{url}/v1/requests", headers=headers(KEY_B), json=body, timeout=10)
    assert first_a.status_code == 202 and again_a.status_code == 200
    assert again_a.json()["id"] == first_a.json()["id"]
    assert first_b.status_code == 202, "B's key does not replay A's request"
    assert first_b.json()["id"] != first_a.json()["id"]
    assert httpx.get(f"{url}/v1/requests/{first_b.json()['id']}", headers=headers(KEY_A),
                     timeout=10).status_code == 404


def test_unknown_and_foreign_ids_take_the_same_code_path(tenants_stack: tuple[str, Settings]
                                                         ) -> None:
    """Timing-free: both answers come from the one `load_owned` check, after one Redis read.

    We do not time anything (that would be flaky); we assert that the unknown-id and
    foreign-id answers are byte-identical apart from the id, for a *finished* request too.
    """
    url, _settings = tenants_stack
    done = httpx.post(f"{url}/v1/requests", headers=headers(KEY_A), timeout=10, json={
        "priority": "high", "messages": [{"role": "user", "content": "quick one"}]}).json()["id"]
    wait_until(lambda: httpx.get(f"{url}/v1/requests/{done}", headers=headers(KEY_A))
               .json()["status"] == "completed", 20, message="A's request completed")
    unknown = uuid.uuid4().hex
    for method in ("GET", "DELETE"):
        foreign = httpx.request(method, f"{url}/v1/requests/{done}", headers=headers(KEY_B))
        missing = httpx.request(method, f"{url}/v1/requests/{unknown}", headers=headers(KEY_B))
        assert normalized(foreign, done) == normalized(missing, unknown)
        assert foreign.status_code == 404
