"""Logging: the redaction processor, and the API's real log file never holding the API key."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from hybrid_router.router.core.logs import redact_secrets
from hybrid_router.settings import Settings
from tests.support import Stack, delete_prefix, wait_until

SECRET_KEY = "sk-live-CLIENTKEY-9f8e7d6c5b4a"


def test_redaction_masks_secret_fields_and_bearer_tokens() -> None:
    event: dict[str, Any] = {
        "event": f"calling upstream with Authorization: Bearer {SECRET_KEY}",
        "api_key": SECRET_KEY,
        "Authorization": f"Bearer {SECRET_KEY}",
        "upstream_api_key": "anything",
        "callback_secret": "s3cret",
        "note": f"the key {SECRET_KEY} leaked into text",
        "request_id": "abc",
        "count": 3,
    }
    out = redact_secrets(None, "info", dict(event))
    assert SECRET_KEY not in orjson.dumps(out).decode()
    assert out["api_key"] == out["Authorization"] == out["callback_secret"] == "***"
    assert out["event"].startswith("calling upstream with Authorization: Bearer ***")
    assert out["request_id"] == "abc" and out["count"] == 3


@pytest.fixture
def api_key_settings(redis_base_url: str) -> Settings:
    return Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                    api_keys={SECRET_KEY: "acme", "plainkey-0123456789": "other"},
                    upstream_api_key="sk-upstream-SECRET-123456", log_format="json",
                    log_level="DEBUG", _env_file=None)


def test_api_logs_are_json_with_request_id_and_never_the_key(
    api_key_settings: Settings, redis_base_url: str
) -> None:
    stack = Stack(api_key_settings)
    try:
        url = stack.start_api()
        auth = {"Authorization": f"Bearer {SECRET_KEY}"}
        rid = httpx.post(f"{url}/v1/requests", headers=auth, json={
            "messages": [{"role": "user", "content": "hi"}], "priority": "low"}).json()["id"]
        bad = {"Authorization": "Bearer plainkey-wrong-0123456789"}
        assert httpx.post(f"{url}/v1/requests", headers=bad, json={}).status_code == 401
        httpx.delete(f"{url}/v1/requests/{rid}", headers=auth)
        log = wait_until(lambda: (t := stack.processes[0].output()) and rid in t and t, 10,
                         message="the request id in the API log")
    finally:
        stack.stop()
        delete_prefix(f"{redis_base_url}/0", api_key_settings.key_prefix)
    assert SECRET_KEY not in log and "CLIENTKEY" not in log
    assert "sk-upstream-SECRET" not in log and "plainkey" not in log
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    accepted = [line for line in lines if line.get("request_id") == rid]
    assert accepted and accepted[0]["event"] == "request accepted"
    assert {"level", "timestamp"} <= set(accepted[0])
