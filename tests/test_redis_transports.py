"""The lanes over every kind of Redis URL: TLS (``rediss://``, a self-signed certificate) and a
unix socket, on a private redis-server that has no plain TCP port at all and requires a
password (so every connection, redis-py's, Celery's and the raw ones, logs in from the URL).

Each runs the router end to end: a high request streamed over SSE and through the drop-in with
the openai SDK, and a low request through the batch lane (beat, flush, poll, write-back). The
raw connections of the hot paths take these URLs too: the stream engine's consumer waits on
its own hiredis connection (``BRPOPLPUSH``, no redis-py ``lib-name``) and the API's event hub
subscribes on one, both seen in ``CLIENT LIST`` on this server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings
from tests.support import Stack, start_tls_redis_server, wait_until
from tests.test_stream_lane import assert_complete, direct_answer, sse, token_text

MODEL = "gpt-4o-mini"
KEY = "sk-transport-tenant"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    proc, tls_url, unix_url = start_tls_redis_server(Path(tmp_path_factory.mktemp("tls-redis")),
                                                     password="s3cret-transports")
    try:
        yield {"rediss": tls_url, "unix": unix_url}
    finally:
        proc.stop()


def messages(tag: str, directive: str = "") -> Any:
    return [{"role": "user", "content": f"Transport {tag} {uuid.uuid4().hex} {directive}"}]


def raw_clients(url: str, local: bool) -> list[dict[str, str]]:
    """`CLIENT LIST` entries of this server opened over a unix socket (`local`) or TCP+TLS,
    without redis-py's ``lib-name``: the router's raw hiredis connections."""
    return [c for c in sync_client(url).client_list()
            if not c.get("lib-name") and c["addr"].startswith("/") == local]


@pytest.mark.parametrize("kind", ["rediss", "unix"])
def test_both_lanes_end_to_end(tls_redis: dict[str, str], sim_url: str, kind: str) -> None:
    url = tls_redis[kind]
    settings = Settings(
        redis_url=url, key_prefix=f"t{uuid.uuid4().hex[:10]}", upstream_base_url=sim_url,
        upstream_api_key="sk-test-simulator", api_keys={KEY: "tenant-a"},
        stream_worker_concurrency=4, flush_interval_s=0.5, poll_interval_s=0.3,
        batch_mode="native", sse_keepalive_s=0.3, log_format="json")
    with Stack(settings) as stack:
        stack.start_api(timeout=60)
        stack.start_worker("stream", timeout=60)
        stack.start_worker("batch", timeout=60)
        stack.start_beat(timeout=60)
        http = httpx.Client(base_url=stack.api_url, headers=AUTH, timeout=30)

        # High, streamed over SSE while the API follows it on its event hub.
        high = messages(kind, "[[sim:tps=200,tokens=30]]")
        r = http.post("/v1/requests", json={"model": MODEL, "messages": high,
                                            "priority": "high"})
        assert r.status_code == 202, r.text
        events, _ = sse(http, r.json()["id"])
        assert_complete(events, direct_answer(sim_url, high))

        # High, through the drop-in with the official SDK, streamed.
        sdk = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=KEY, max_retries=0)
        dropin = messages(kind, "[[sim:tokens=20]]")
        chunks = sdk.chat.completions.create(model=MODEL, messages=dropin, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == direct_answer(sim_url, dropin)

        # Low, through the batch lane: flushed into a batch job, its result written back.
        low = messages(kind)
        r = http.post("/v1/requests", json={"model": MODEL, "messages": low, "priority": "low"})
        assert r.status_code == 202 and r.json()["route"] == "batch", r.text
        record = wait_until(
            lambda: (rec := http.get(f"/v1/requests/{r.json()['id']}").json())["status"]
            in ("completed", "failed") and rec, 60, 0.1, message="low request written back")
        assert record["status"] == "completed", record
        assert record["batch_id"] and record["result"]["content"] == direct_answer(sim_url, low)

        # The hot paths' raw connections run over this transport: the engine's consumer
        # blocked in BRPOPLPUSH, and the event hub's subscriber connection.
        raw = raw_clients(url, local=kind == "unix")
        assert any(c["cmd"] == "brpoplpush" for c in raw), raw
        assert any(c["cmd"] in ("subscribe", "unsubscribe") for c in raw), raw
        assert token_text(events)
        http.close()
