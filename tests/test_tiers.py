"""Service tiers end to end: the flex lane, the priority tier, flex under pressure, billing by
the tier that served, through a real API, stream and batch workers, beat, Redis and the
simulator, with the official openai SDK (the drop-in) and the project's client (the intake)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from hybrid_router.router.client import RouterClient
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.ledger import Ledger
from hybrid_router.router.core.pricing import MTOK, tier_rates
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.simulator import prompt_hash
from hybrid_router.simulator.testing import running_simulator, sim_last_request, sim_stats
from hybrid_router.workers.stream.flex_pressure import move_to_batch_call
from tests.support import Stack, wait_until

KEY = "sk-tiers-tenant"
ADMIN = "sk-tiers-admin"
FLEX_MODEL = "gpt-5-mini"  # has flex and priority prices; priority tier configured for high
OTHER_FLEX_MODEL = "gpt-5"  # flex and priority prices; priority tier not configured
NO_FLEX_UPSTREAM = "gpt-5-nano"  # priced for flex, but the simulator refuses flex for it
PLAIN_MODEL = "gpt-4o-mini"  # no flex price


@pytest.fixture(scope="module")
def tier_sim() -> Iterator[str]:
    with running_simulator(ttft_s=0.0, tokens_per_s=0.0, batch_turnaround_s=0.3,
                           no_flex_models=[NO_FLEX_UPSTREAM]) as url:
        yield url


@pytest.fixture(scope="module")
def stack(redis_base_url: str, tier_sim: str) -> Iterator[Stack]:
    settings = Settings(
        redis_url=f"{redis_base_url}/0", key_prefix=f"t{uuid.uuid4().hex[:10]}",
        upstream_base_url=tier_sim, upstream_api_key="sk-test-simulator",
        api_keys={KEY: "tenant-a", ADMIN: "admin"}, retry_backoff_base_s=0.02,
        retry_backoff_max_s=0.1, flush_interval_s=1.0, poll_interval_s=0.3,
        expected_batch_turnaround_s=30.0, batch_mode="native", flex_max_retries=2,
        priority_tier_models=[FLEX_MODEL], expected_flex_latency_s=5.0, log_format="json",
    )
    with Stack(settings) as s:
        s.start_api(timeout=60)
        s.start_worker("stream", timeout=60)
        s.start_worker("batch", timeout=60)
        s.start_beat(timeout=60)
        yield s


@pytest.fixture(scope="module")
def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[RouterClient]:
    with RouterClient(stack.api_url, api_key=KEY) as c:
        yield c


@pytest.fixture(scope="module")
def r(stack: Stack) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(stack.settings.redis_url)
    yield c
    c.close()


def msgs(directive: str = "") -> Any:
    return [{"role": "user", "content": f"Tiers {uuid.uuid4().hex} {directive}"}]


def record_of(stack: Stack, r: redis.Redis, request_id: str) -> Any:
    record = RequestStore(r, stack.settings).get(request_id)
    assert record is not None
    return record


def events_of(stack: Stack, r: redis.Redis, request_id: str) -> list[dict[str, Any]]:
    return RequestStore(r, stack.settings).events_after(request_id, 0)


def expected_cost(settings: Settings, model: str, tier: str, usage: Any) -> Decimal:
    rate_in, rate_out = tier_rates(settings, model, tier)
    return ((usage.prompt_tokens * rate_in + usage.completion_tokens * rate_out) / MTOK
            ).quantize(Decimal("0.000000000001"))


def request_id_of(response: Any) -> str:
    return str(response.id).removeprefix("chatcmpl-")


def test_x_priority_normal_goes_to_flex_and_is_billed_at_flex(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, tier_sim: str) -> None:
    m = msgs()
    reply = sdk.chat.completions.with_raw_response.create(
        model=FLEX_MODEL, messages=m, extra_headers={"X-Priority": "normal"})
    completion = reply.parse()
    assert reply.headers["x-router-lane"] == "flex"
    assert completion.service_tier == "flex"
    assert sim_last_request(tier_sim, prompt_hash(m))["service_tier"] == "flex"
    record = record_of(stack, r, request_id_of(completion))
    assert record.route == "flex" and record.service_tier == "flex"
    assert record.served_tier == "flex"
    assert "flex" in record.route_reason and record.expected_latency_s is not None
    assert record.usage is not None and record.usage.completion_tokens > 0
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "flex", record.usage)
    assert record.cost_usd < expected_cost(stack.settings, FLEX_MODEL, "default", record.usage)


def test_flex_streams_through_the_sdk_with_the_served_tier(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis) -> None:
    chunks = list(sdk.chat.completions.create(
        model=FLEX_MODEL, messages=msgs("[[sim:tokens=12]]"), stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Priority": "normal"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 12
    assert chunks[-1].usage is not None and chunks[-1].service_tier == "flex"
    record = record_of(stack, r, request_id_of(chunks[0]))
    assert record.route == "flex" and record.result.content == text


def test_normal_on_a_model_without_flex_price_streams_at_standard(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, tier_sim: str) -> None:
    m = msgs()
    completion = sdk.chat.completions.create(model=PLAIN_MODEL, messages=m)
    assert completion.service_tier == "default"
    assert "service_tier" not in sim_last_request(tier_sim, prompt_hash(m))
    record = record_of(stack, r, request_id_of(completion))
    assert record.route == "stream" and record.served_tier == "default"
    assert record.cost_usd == expected_cost(stack.settings, PLAIN_MODEL, "default", record.usage)


def test_high_goes_at_priority_tier_only_where_configured(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, tier_sim: str) -> None:
    m = msgs()
    fast = sdk.chat.completions.create(model=FLEX_MODEL, messages=m,
                                       extra_headers={"X-Priority": "high"})
    assert fast.service_tier == "priority"
    assert sim_last_request(tier_sim, prompt_hash(m))["service_tier"] == "priority"
    record = record_of(stack, r, request_id_of(fast))
    assert record.route == "stream" and record.service_tier == "priority"
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "priority", record.usage)
    plain = sdk.chat.completions.create(model=OTHER_FLEX_MODEL, messages=msgs(),
                                        extra_headers={"X-Priority": "high"})
    assert plain.service_tier == "default"


def test_client_service_tier_is_honoured_and_billed_as_served(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, client: RouterClient) -> None:
    asked = sdk.chat.completions.create(model=OTHER_FLEX_MODEL, messages=msgs(),
                                        service_tier="priority")
    assert asked.service_tier == "priority"
    record = record_of(stack, r, request_id_of(asked))
    assert record.cost_usd == expected_cost(stack.settings, OTHER_FLEX_MODEL, "priority",
                                            record.usage)
    # Asked for flex, but the upstream says the default tier served it: billed at default.
    downgraded = sdk.chat.completions.create(model=OTHER_FLEX_MODEL,
                                             messages=msgs("[[sim:tier=default]]"),
                                             service_tier="flex")
    assert downgraded.service_tier == "default"
    record = record_of(stack, r, request_id_of(downgraded))
    assert record.route == "flex" and record.service_tier == "flex"
    assert record.served_tier == "default"
    assert record.cost_usd == expected_cost(stack.settings, OTHER_FLEX_MODEL, "default",
                                            record.usage)
    # The intake takes it too (a low request asking for flex is not batched).
    handle = client.submit(msgs(), model=OTHER_FLEX_MODEL, priority="low", service_tier="flex")
    assert handle.submitted["route"] == "flex" and handle.submitted["service_tier"] == "flex"
    done = client.wait(handle.id, timeout=30)
    assert done["status"] == "completed" and done["served_tier"] == "flex"


def test_bad_service_tier_is_a_clear_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=FLEX_MODEL, messages=msgs(),
                                    extra_body={"service_tier": "turbo"})
    assert "service_tier" in str(err.value)


def test_flex_429_is_retried_and_paid_once(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, tier_sim: str) -> None:
    m = msgs("[[sim:flex_429=2,retry_after=0.01]]")
    completion = sdk.chat.completions.create(model=FLEX_MODEL, messages=m)
    assert completion.service_tier == "flex"
    stats = sim_stats(tier_sim, prompt_hash(m))
    assert stats["flex_refused_429"] == 2 and stats["served_flex"] == 1
    record = record_of(stack, r, request_id_of(completion))
    assert record.route == "flex"
    assert not [e for e in events_of(stack, r, record.id) if e["type"] == "lane_changed"]
    assert completion.usage is not None
    assert record.usage.prompt_tokens == completion.usage.prompt_tokens  # one call billed
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "flex", record.usage)


def test_flex_429_near_the_deadline_moves_to_standard_once(
        stack: Stack, client: RouterClient, r: redis.Redis, tier_sim: str) -> None:
    m = msgs("[[sim:flex_429=1000,retry_after=0.01]]")
    handle = client.submit(m, model=FLEX_MODEL, priority="normal", deadline_s=20)
    assert handle.submitted["route"] == "flex", handle.submitted
    done = client.wait(handle.id, timeout=30)
    assert done["status"] == "completed"
    assert done["route"] == "stream" and done["served_tier"] == "default"
    assert "standard tier" in done["route_reason"]
    stats = sim_stats(tier_sim, prompt_hash(m))
    assert stats["flex_refused_429"] == 1 + stack.settings.flex_max_retries
    assert stats["served_default"] == 1
    moves = [e for e in events_of(stack, r, handle.id) if e["type"] == "lane_changed"]
    assert [(e["from"], e["to"]) for e in moves] == [("flex", "stream")]
    record = record_of(stack, r, handle.id)
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "default", record.usage)


def test_flex_429_with_a_far_deadline_moves_to_the_batch_lane(
        stack: Stack, client: RouterClient, r: redis.Redis, tier_sim: str) -> None:
    m = msgs("[[sim:flex_429=1000,retry_after=0.01]]")
    handle = client.submit(m, model=FLEX_MODEL, priority="normal", deadline_s=3000)
    assert handle.submitted["route"] == "flex"
    done = client.wait(handle.id, timeout=60)
    assert done["status"] == "completed", done
    assert done["route"] == "batch" and done["batch_id"]
    moves = [e for e in events_of(stack, r, handle.id) if e["type"] == "lane_changed"]
    assert [(e["from"], e["to"]) for e in moves] == [("flex", "batch")]
    assert sim_stats(tier_sim, prompt_hash(m))["flex_refused_429"] == \
        1 + stack.settings.flex_max_retries
    record = record_of(stack, r, handle.id)
    assert "service_tier" not in record.body
    standard = expected_cost(stack.settings, FLEX_MODEL, "default", record.usage)
    assert record.cost_usd == (standard * (1 - stack.settings.batch_discount)).quantize(
        Decimal("0.000000000001"))


def test_flex_refused_by_the_upstream_is_remembered(
        stack: Stack, client: RouterClient, sdk: openai.OpenAI, r: redis.Redis,
        tier_sim: str) -> None:
    m = msgs()
    first = sdk.chat.completions.create(model=NO_FLEX_UPSTREAM, messages=m)
    assert first.service_tier == "default"
    assert sim_stats(tier_sim, prompt_hash(m))["flex_refused_400"] == 1
    record = record_of(stack, r, request_id_of(first))
    assert record.route == "stream" and "refused flex" in record.route_reason
    moves = [e for e in events_of(stack, r, record.id) if e["type"] == "lane_changed"]
    assert [(e["from"], e["to"]) for e in moves] == [("flex", "stream")]
    keys = Keys(stack.settings.key_prefix)
    until = float(r.hget(keys.flex_unsupported(), NO_FLEX_UPSTREAM) or 0)
    assert until > time.time() + stack.settings.flex_unsupported_ttl_s - 60
    assert 0 < (r.ttl(keys.flex_unsupported()) or 0) <= stack.settings.flex_unsupported_ttl_s
    worker_logs = "\n".join(p.output() for p in stack.processes if p.name == "worker-stream")
    assert worker_logs.count("does not serve this model at the flex tier") == 1

    # The intake's lane facts are at most a couple of seconds old: later requests go straight
    # to the standard tier, and the upstream is not asked for flex again.
    def routed_standard() -> bool:
        handle = client.submit(msgs(), model=NO_FLEX_UPSTREAM, priority="normal")
        client.wait(handle.id, timeout=30)
        return handle.submitted["route"] == "stream"

    wait_until(routed_standard, 15, 0.2, message="intake learned the flex refusal")
    m2 = msgs()
    again = client.submit(m2, model=NO_FLEX_UPSTREAM, priority="normal")
    assert again.submitted["route"] == "stream"
    assert "refused flex" in again.submitted["route_reason"]
    client.wait(again.id, timeout=30)
    assert sim_stats(tier_sim, prompt_hash(m2)).get("flex_refused_400", 0) == 0


def test_low_with_a_short_deadline_takes_flex_not_standard(
        client: RouterClient) -> None:
    handle = client.submit(msgs(), model=FLEX_MODEL, priority="low", deadline_s=25)
    assert handle.submitted["route"] == "flex"
    assert "batch round trip" in handle.submitted["route_reason"]
    assert client.wait(handle.id, timeout=30)["status"] == "completed"
    batched = client.submit(msgs(), model=FLEX_MODEL, priority="low")
    assert batched.submitted["route"] == "batch"
    assert client.wait(batched.id, timeout=60)["status"] == "completed"


def test_stats_and_metrics_show_lanes_tiers_and_learned_latency(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis) -> None:
    for _ in range(2):
        sdk.chat.completions.create(model=FLEX_MODEL, messages=msgs())
    stats = httpx.get(f"{stack.api_url}/v1/stats", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=10).json()
    rows = {(row["lane"], row["model"]): row for row in stats["expected_latency"]["measured"]}
    assert rows[("flex", FLEX_MODEL)]["observations"] >= 2
    assert 0 <= rows[("flex", FLEX_MODEL)]["expected_s"] < stack.settings.expected_flex_latency_s
    assert stats["expected_latency"]["starting_values_s"]["flex"] == \
        stack.settings.expected_flex_latency_s
    assert NO_FLEX_UPSTREAM in stats["expected_latency"]["flex_refused_until"]

    ledger = Ledger.from_hash(r.hgetall(Keys(stack.settings.key_prefix).ledger()))
    flex = ledger.lines[("flex", "flex", FLEX_MODEL)]
    assert stats["ledger"]["by_tier"]["flex"]["cost_usd"] == f"{ledger.total(tier='flex').cost_usd:.12f}"
    assert stats["ledger"]["flex"]["requests"] == ledger.total("flex").requests
    assert flex.savings_usd > 0
    priority = ledger.total(tier="priority")
    assert priority.requests >= 1 and priority.savings_usd < 0  # priority costs more

    text = httpx.get(f"{stack.api_url}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = ("hybrid_router_cost_usd_total",
           (("model", FLEX_MODEL), ("route", "flex"), ("tier", "flex")))
    assert samples[key] == pytest.approx(float(flex.cost_usd))
    assert samples[("hybrid_router_finished_requests_total",
                    (("model", FLEX_MODEL), ("route", "flex"), ("tier", "flex")))] == flex.requests


def test_move_to_batch_takes_only_a_streaming_request_this_run_holds(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    record = RequestRecord(
        id=uuid.uuid4().hex, tenant="t", priority="normal", route="flex", status="streaming",
        model=FLEX_MODEL, created_at=time.time(), deadline_at=time.time() + 3000,
        service_tier="flex", body={"model": FLEX_MODEL, "service_tier": "flex",
                                   "messages": [{"role": "user", "content": "hi"}]})
    redis_client.hset(keys.record(record.id), mapping=dict(record.to_hash()))
    redis_client.zadd(keys.streaming(), {record.id: time.time()})
    redis_client.set(keys.lease(record.id), "another-worker")
    script, script_keys, args = move_to_batch_call(record, settings, "this-worker", "why")
    assert script(redis_client, script_keys, args) == 0  # another worker holds it
    assert redis_client.llen(keys.pending(FLEX_MODEL)) == 0
    redis_client.set(keys.lease(record.id), "this-worker")
    assert script(redis_client, script_keys, args) == 1
    moved = RequestStore(redis_client, settings).get(record.id)
    assert moved is not None and (moved.status, moved.route) == ("queued", "batch")
    assert moved.service_tier is None and "service_tier" not in moved.body
    assert redis_client.lrange(keys.pending(FLEX_MODEL), 0, -1) == [record.id.encode()]
    assert redis_client.zscore(keys.batch_deadlines(), record.id) == record.deadline_at
    assert not redis_client.exists(keys.lease(record.id))
    assert redis_client.zscore(keys.streaming(), record.id) is None
    events = RequestStore(redis_client, settings).events_after(record.id, 0)
    assert [(e["type"], e["to"]) for e in events] == [("lane_changed", "batch")]
    assert script(redis_client, script_keys, args) == 0  # once only: it is queued now


# --- the Responses API takes the same lanes and tiers as chat ---------------------------------


def test_a_normal_response_goes_to_flex_and_is_billed_at_flex(
        stack: Stack, sdk: openai.OpenAI, r: redis.Redis, tier_sim: str) -> None:
    prompt = f"tiers for responses {uuid.uuid4().hex}"
    reply = sdk.responses.with_raw_response.create(
        model=FLEX_MODEL, input=prompt, extra_headers={"X-Priority": "normal"})
    response = reply.parse()
    assert response.service_tier == "flex" and response.output_text
    assert sim_last_request(tier_sim, prompt_hash([{"role": "user", "content": prompt}])
                            )["service_tier"] == "flex"
    record = record_of(stack, r, reply.headers["x-request-id"])
    assert record.route == "flex" and record.served_tier == "flex"
    assert record.usage is not None and record.usage.completion_tokens > 0
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "flex", record.usage)
    assert record.cost_usd < expected_cost(stack.settings, FLEX_MODEL, "default", record.usage)


def test_a_streamed_response_under_flex_pressure_moves_to_standard_once(
        stack: Stack, client: RouterClient, r: redis.Redis, tier_sim: str) -> None:
    prompt = f"[[sim:flex_429=1000,retry_after=0.01]] {uuid.uuid4().hex}"
    handle = client.submit(None, endpoint="/v1/responses", input=prompt, stream=False,
                           model=FLEX_MODEL, priority="normal", deadline_s=20)
    assert handle.submitted["route"] == "flex", handle.submitted
    done = client.wait(handle.id, timeout=30)
    assert done["status"] == "completed", done
    assert done["route"] == "stream" and done["served_tier"] == "default"
    stats = sim_stats(tier_sim, prompt_hash([{"role": "user", "content": prompt}]))
    assert stats["flex_refused_429"] == 1 + stack.settings.flex_max_retries
    assert stats["served_default"] == 1
    events = events_of(stack, r, handle.id)
    moves = [e for e in events if e["type"] == "lane_changed"]
    assert [(e["from"], e["to"]) for e in moves] == [("flex", "stream")]
    completed = [e for e in events if e["type"] == "response"
                 and e.get("event", {}).get("type") == "response.completed"]
    assert completed and completed[0]["event"]["response"]["service_tier"] == "default"
    record = record_of(stack, r, handle.id)
    assert record.cost_usd == expected_cost(stack.settings, FLEX_MODEL, "default", record.usage)
