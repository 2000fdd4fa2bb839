"""`/metrics` and `/v1/stats`: what Redis holds, read at scrape time by a real API process.

Requests are accepted through the real intake (`enqueue`, no workers running so they stay
where intake put them), batches and ledger lines are written the way the lanes write them,
and latencies are pushed with `observe_finished`; then the API is scraped over HTTP.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hybrid_router.router.client import enqueue
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import add_to_ledger, ledger_increments
from hybrid_router.router.core.metrics import (
    BUCKETS,
    RouterCollector,
    histograms_from_hash,
    observe_finished,
    timing_observations,
)
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.router.core.runtime_config import set_flush_interval
from hybrid_router.router.core.stats import take_snapshot
from hybrid_router.settings import Settings
from tests.support import Stack, delete_prefix

MSG = [{"role": "user", "content": "hello metrics"}]


def _record(**overrides: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "id": "r1", "tenant": "default", "priority": "high", "route": "stream",
        "status": "completed", "model": "gpt-4o-mini", "created_at": 1000.0,
    }
    values.update(overrides)
    return RequestRecord(**values)


def test_timing_observations_per_lane() -> None:
    stream = _record(first_token_at=1000.2, finished_at=1003.0)
    assert timing_observations(stream) == pytest.approx({"ttft": 0.2, "e2e": 3.0})
    batch = _record(route="batch", priority="low", finished_at=1060.0)
    assert timing_observations(batch) == pytest.approx({"ttft": 60.0, "e2e": 60.0})
    failed = _record(route="batch", priority="low", status="failed", finished_at=1010.0)
    assert timing_observations(failed) == pytest.approx({"e2e": 10.0})
    assert timing_observations(_record(status="streaming")) == {}


def test_observations_accumulate_exactly_in_redis(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    for ttft, total in ((0.04, 1.0), (0.3, 2.0), (0.3, 200.0)):
        observe_finished(redis_client, keys,
                         _record(first_token_at=1000 + ttft, finished_at=1000 + total))
    hists = histograms_from_hash(redis_client.hgetall(keys.timings("stream")))
    assert hists["ttft"].count == 3 and hists["e2e"].count == 3
    assert hists["ttft"].sum_s == pytest.approx(0.64, abs=1e-5)
    cumulative = dict(hists["ttft"].cumulative())
    assert cumulative["0.05"] == 1 and cumulative["0.5"] == 3 and cumulative["+Inf"] == 3
    assert dict(hists["e2e"].cumulative())["120.0"] == 2
    assert len(hists["e2e"].buckets) == len(BUCKETS) + 1


def _populate(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """Two models queued on the batch lane, one stream request waiting, one batch in flight,
    ledger lines for both lanes and one finished request per lane."""
    keys = Keys(settings.key_prefix)
    low_mini = [enqueue(settings, MSG, priority="low", model="gpt-4o-mini") for _ in range(3)]
    low_4o = [enqueue(settings, MSG, priority="low", model="gpt-4o")]
    high = enqueue(settings, MSG, priority="high", model="gpt-4o")
    client.hset(keys.batch("batch_1"), mapping={"status": "in_progress", "model": "gpt-4o-mini"})
    client.zadd(keys.batches_in_flight(), {"batch_1": time.time()})
    usage = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    pipe = client.pipeline()
    add_to_ledger(pipe, keys, ledger_increments(settings, "stream", "gpt-4o-mini", usage)[1])
    add_to_ledger(pipe, keys, ledger_increments(settings, "batch", "gpt-4o-mini", usage)[1])
    pipe.execute()
    set_flush_interval(client, settings, 42, by="test_metrics")
    client.hset(keys.last_flush(), mapping={"at": "1700000000.5", "submitted": 2, "batches": 1})
    observe_finished(client, keys, _record(first_token_at=1000.08, finished_at=1001.0))
    observe_finished(client, keys, _record(route="batch", priority="low", finished_at=1030.0))
    return {"low_mini": low_mini, "low_4o": low_4o, "high": high}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _get(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
         **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_and_stats_over_http(
    make_settings: Callable[..., Settings], redis_client: redis.Redis,
    stack_factory: Callable[[Settings], Stack],
) -> None:
    settings = make_settings(api_keys={"sk-ops": "admin", "sk-app": "app"})
    keys = Keys(settings.key_prefix)
    _populate(settings, redis_client)
    url = stack_factory(settings).start_api()

    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    s = _samples(response.text)
    assert _get(s, "hybrid_router_queue_depth", lane="batch", model="gpt-4o-mini", state="queued") == 3
    assert _get(s, "hybrid_router_queue_depth", lane="batch", model="gpt-4o", state="queued") == 1
    assert _get(s, "hybrid_router_queue_depth", lane="stream", model="gpt-4o", state="dispatched") == 1
    assert _get(s, "hybrid_router_celery_queue_length", queue=keys.stream_queue()) == 1
    assert _get(s, "hybrid_router_oldest_queued_age_seconds", lane="batch") > 0
    assert _get(s, "hybrid_router_oldest_queued_age_seconds", lane="stream") > 0
    assert _get(s, "hybrid_router_batches_in_flight", status="in_progress") == 1
    assert _get(s, "hybrid_router_tokens_total", route="stream", tier="default",
                model="gpt-4o-mini", kind="completion") == 500
    # gpt-4o-mini: 1000 * 0.15 + 500 * 0.60 per million = $0.00045; the batch pays half.
    assert _get(s, "hybrid_router_cost_usd_total", route="stream", tier="default",
                model="gpt-4o-mini") == pytest.approx(0.00045)
    assert _get(s, "hybrid_router_cost_usd_total", route="batch", tier="batch",
                model="gpt-4o-mini") == pytest.approx(0.000225)
    assert _get(s, "hybrid_router_savings_usd_total", route="batch", tier="batch",
                model="gpt-4o-mini") == pytest.approx(0.000225)
    assert _get(s, "hybrid_router_flush_interval_seconds") == 42
    assert _get(s, "hybrid_router_last_flush_timestamp_seconds") == 1700000000.5
    assert _get(s, "hybrid_router_time_to_first_token_seconds_count", lane="stream") == 1
    assert _get(s, "hybrid_router_time_to_first_token_seconds_bucket", lane="stream",
                le="0.1") == 1
    assert _get(s, "hybrid_router_request_duration_seconds_count", lane="batch") == 1
    assert _get(s, "hybrid_router_request_duration_seconds_bucket", lane="batch", le="10.0") == 0
    assert _get(s, "hybrid_router_request_duration_seconds_bucket", lane="batch", le="30.0") == 1

    # /v1/stats is the same snapshot as JSON; it sums every tenant, so it is for admins only.
    assert httpx.get(f"{url}/v1/stats", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/stats", headers={"Authorization": "Bearer sk-app"},
                     timeout=10).status_code == 403
    stats = httpx.get(f"{url}/v1/stats", headers={"Authorization": "Bearer sk-ops"},
                      timeout=10).json()
    assert stats["queues"]["batch"]["total"] == 4
    assert stats["queues"]["stream"]["total"] == 1
    assert stats["batches_in_flight"] == {"total": 1, "by_status": {"in_progress": 1}}
    assert stats["ledger"]["batch"]["savings_usd"] == "0.000225000000"
    assert stats["latency"]["stream"]["ttft"]["count"] == 1
    # Numbers are JSON numbers; the override is shown with its origin.
    assert stats["last_flush"] == {"at": 1700000000.5, "flush_id": None, "submitted": 2,
                                   "batches": 1, "error": None}
    assert stats["flush_interval_s"] == 42
    assert stats["flush_interval"]["source"] == "run-time override"
    assert stats["flush_interval"]["set_by"] == "test_metrics"
    assert _get(s, "hybrid_router_flush_interval_overridden") == 1


def test_snapshot_of_an_empty_prefix_is_all_zero(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    snap = take_snapshot(redis_client, make_settings())
    assert snap.queues == [] and snap.batch_ids_in_flight == []
    assert snap.oldest_age_s == {"batch": 0.0, "stream": 0.0}
    assert set(snap.celery_queues.values()) == {0}
    assert snap.ledger.total().requests == 0
    assert snap.flush_interval_s == 60.0 and snap.last_flush == {}


def test_an_empty_deployment_shows_zeros_not_gaps(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    """Zero is reported as 0 (every lane x state x operator-named model, every in-flight batch
    status), never left out; /v1/stats shows numbers as numbers and money in plain notation."""
    settings = make_settings(allowed_models=["my-model"])
    snap = take_snapshot(redis_client, settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(snap))
    s = _samples(generate_latest(registry).decode())
    for model in ("gpt-4o-mini", "gpt-4o", "my-model", "other"):
        assert _get(s, "hybrid_router_queue_depth", lane="batch", model=model, state="queued") == 0
        for state in ("dispatched", "streaming"):
            assert _get(s, "hybrid_router_queue_depth", lane="stream", model=model,
                        state=state) == 0
    assert ("hybrid_router_queue_depth", (("lane", "batch"), ("model", "*"),
                                          ("state", "queued"))) not in s
    for status in ("validating", "in_progress", "finalizing", "cancelling"):
        assert _get(s, "hybrid_router_batches_in_flight", status=status) == 0
    assert _get(s, "hybrid_router_last_flush_timestamp_seconds") == 0
    assert _get(s, "hybrid_router_beat_last_tick_timestamp_seconds") == 0
    assert _get(s, "hybrid_router_flush_interval_overridden") == 0

    data = snap.as_dict()
    values = json.dumps(list(_leaf_values(data)))  # values only: key names may hold hex ids
    assert not re.search(r"\d[eE][-+]?\d", values), values  # no exponent notation anywhere
    assert data["ledger"]["total"]["cost_usd"] == "0.000000000000"
    assert data["last_flush"] == {"at": None, "flush_id": None, "submitted": 0, "batches": 0,
                                  "error": None}
    assert data["flush_interval"]["source"] == "ROUTER_FLUSH_INTERVAL_S"
    assert data["beat"] is None


def _leaf_values(node: Any) -> Iterator[Any]:
    """Every scalar in a JSON-shaped value, without the dict keys that hold it."""
    if isinstance(node, dict):
        for child in node.values():
            yield from _leaf_values(child)
    elif isinstance(node, list):
        for child in node:
            yield from _leaf_values(child)
    else:
        yield node


@pytest.fixture(scope="module")
def lanes_metrics(redis_base_url: str, sim_url: str) -> Iterator[dict[Any, float]]:
    """/metrics after one high and one low request went through real lanes (run once)."""
    from hybrid_router.router.client import RouterClient

    settings = Settings(redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
                        upstream_base_url=sim_url, upstream_api_key="sk-test-simulator",
                        log_format="json", flush_interval_s=1, poll_interval_s=0.5)
    stack = Stack(settings)
    try:
        url = stack.start_api()
        stack.start_worker("stream", concurrency=4)
        stack.start_worker("batch", concurrency=4)
        stack.start_beat()
        with RouterClient(url) as client:
            high = client.submit(MSG, priority="high")
            low = client.submit(MSG, priority="low")
            assert high.result(timeout=30)["status"] == "completed"
            assert low.result(timeout=60)["status"] == "completed"
        yield _samples(httpx.get(f"{url}/metrics", timeout=10).text)
    finally:
        stack.stop()
        delete_prefix(f"{redis_base_url}/0", settings.key_prefix)


@pytest.mark.timeout(180)
def test_stream_lane_records_latencies(lanes_metrics: dict[Any, float]) -> None:
    assert _get(lanes_metrics, "hybrid_router_time_to_first_token_seconds_count", lane="stream") == 1
    assert _get(lanes_metrics, "hybrid_router_request_duration_seconds_count", lane="stream") == 1


@pytest.mark.timeout(180)
def test_batch_lane_records_latencies(lanes_metrics: dict[Any, float]) -> None:
    assert _get(lanes_metrics, "hybrid_router_time_to_first_token_seconds_count", lane="batch") == 1
    assert _get(lanes_metrics, "hybrid_router_request_duration_seconds_count", lane="batch") == 1
