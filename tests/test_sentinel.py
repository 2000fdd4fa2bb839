"""Redis behind Sentinel, on loopback: a primary, its replica and three sentinels.

- The whole router (API, stream and batch workers, beat, Flower) runs on a ``sentinel://`` URL;
  a Sentinel failover (``SENTINEL FAILOVER``: the primary is demoted, clients are disconnected)
  in the middle of a run leaves every request completed with its own answer, and requests made
  after it are served by the promoted replica.
- Accepted means durable: with a replica connected, each new request's create is followed by a
  ``WAIT`` (counted in the primary's ``INFO commandstats``); without replicas none is sent; a
  replica that does not answer delays the 202 by at most the timeout and is logged.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from hybrid_router.router.client import enqueue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings
from tests.sentinel_support import SentinelGroup
from tests.support import Stack, free_port, wait_until
from tests.test_outage import wait_terminal


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    sentinels = SentinelGroup(
        tmp_path, (("127.0.0.1", free_port()), ("127.0.0.1", free_port())),
        [("127.0.0.1", free_port()) for _ in range(3)])
    sentinels.start()
    yield sentinels
    sentinels.stop()


def wait_calls(node_client: redis.Redis) -> int:
    stats: dict[str, Any] = node_client.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


def oracle_answer(sim_url: str, content: str) -> str:
    client = openai.OpenAI(base_url=sim_url, api_key="sk-sim")
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}])
    return answer.choices[0].message.content or ""


def streamed(api: str, content: str) -> str:
    """A high request through the drop-in, streamed with the openai SDK."""
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], stream=True,
        extra_headers={"X-Priority": "high"})
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def submit_low(api: str, content: str) -> str:
    response = httpx.post(f"{api}/v1/requests", timeout=10, json={
        "priority": "low", "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def round_of_requests(api: str, sim_url: str, tag: str) -> None:
    """Two streamed high requests and three low ones: each ends completed with its answer."""
    for i in range(2):
        content = f"sentinel {tag} high {i}"
        assert streamed(api, content) == oracle_answer(sim_url, content)
    lows = {submit_low(api, f"sentinel {tag} low {i}"): f"sentinel {tag} low {i}"
            for i in range(3)}
    for request_id, content in lows.items():
        final = wait_terminal(api, request_id, 60, f"low request {tag} completed")
        assert final["status"] == "completed", final
        assert final["result"]["content"] == oracle_answer(sim_url, content)


def test_router_on_sentinel_rides_out_a_failover(
    group: SentinelGroup, make_settings: Callable[..., Settings], sim_url: str,
    stack_factory: Callable[[Settings], Stack],
) -> None:
    settings = make_settings(redis_url=group.url, upstream_base_url=sim_url,
                             batch_mode="native", flush_interval_s=1.0, poll_interval_s=0.5,
                             retry_backoff_base_s=0.05, retry_backoff_max_s=0.5)
    stack = stack_factory(settings)
    api = stack.start_api()
    stack.start_worker("stream", concurrency=8)
    stack.start_worker("batch")
    stack.start_beat()
    flower = stack.start_flower()
    round_of_requests(api, sim_url, "before")

    old = (group.primary.host, group.primary.port)
    sentinel = group.sentinels[0].client()
    sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
    sentinel.close()
    new = (group.replica.host, group.replica.port)
    wait_until(lambda: group.current_master() == new, 30, 0.1, message="the replica promoted")
    wait_until(lambda: group.replica.client().info("replication")["role"] == "master", 30,
               message="the promoted replica is master")
    assert group.current_master() != old

    round_of_requests(api, sim_url, "after")
    # Everything written after the failover went to the promoted replica.
    client = sync_client(settings.redis_url)
    try:
        address = client.connection_pool.get_master_address()  # type: ignore[attr-defined]
        assert tuple(address) == new
    finally:
        client.close()
    # Flower reads the broker through Sentinel too: it lists both workers.
    workers = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, timeout=20).json()
    assert len(workers) == 2, workers


def test_new_request_waits_for_the_replica(
    group: SentinelGroup, make_settings: Callable[..., Settings], sim_url: str,
    stack_factory: Callable[[Settings], Stack],
) -> None:
    settings = make_settings(redis_url=group.url, upstream_base_url=sim_url,
                             redis_wait_timeout_ms=300)
    primary = group.primary.client()
    enqueue(settings, [{"role": "user", "content": "loads the scripts"}], priority="low")
    before = wait_calls(primary)
    # The direct enqueue (sync store): one WAIT after its create.
    request_id = enqueue(settings, [{"role": "user", "content": "durable sync"}],
                         priority="low")
    assert wait_calls(primary) == before + 1
    assert group.replica.client().hget(Keys(settings.key_prefix).record(request_id), "status")

    stack = stack_factory(settings)
    api = stack.start_api()
    before = wait_calls(primary)
    ids = [submit_low(api, f"durable {i}") for i in range(3)]
    assert wait_calls(primary) >= before + 1  # coalesced creates share one WAIT
    assert wait_calls(primary) <= before + len(ids)
    for request_id in ids:  # on the replica as soon as the 202 came
        assert group.replica.client().hget(Keys(settings.key_prefix).record(request_id), "status")

    # A replica that stops answering: the request is still accepted, after the timeout, and
    # the API says so in its log.
    assert group.replica.proc is not None
    group.replica.proc.kill(signal.SIGSTOP)
    try:
        submit_low(api, "durable while the replica is stalled")
        wait_until(lambda: "acknowledged before a replica confirmed" in stack.logs(), 10,
                   message="the API's warning")
    finally:
        group.replica.proc.kill(signal.SIGCONT)
    primary.close()


def test_no_wait_without_replicas(make_settings: Callable[..., Settings], sim_url: str,
                                  redis_client: redis.Redis,
                                  stack_factory: Callable[[Settings], Stack]) -> None:
    settings = make_settings(upstream_base_url=sim_url)
    stack = stack_factory(settings)
    api = stack.start_api()
    before = wait_calls(redis_client)
    submit_low(api, f"no replica {uuid.uuid4().hex[:6]}")
    enqueue(settings, [{"role": "user", "content": "no replica sync"}], priority="low")
    assert wait_calls(redis_client) == before
