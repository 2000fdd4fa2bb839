"""Intake without HTTP: `prepare` (checks, route, budget, record) and `accept_sync` with the real
store: the record is in Redis before the lane is handed the id, and a failed hand-over fails it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis

from hybrid_router.router.core.errors import Conflict, ErrorCode, InvalidRequest, Unavailable
from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings

MSG = [{"role": "user", "content": "hello"}]


def req(**fields: Any) -> SubmitRequest:
    return SubmitRequest.model_validate({"messages": MSG, **fields})


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(allowed_models=["gpt-4o-mini", "gpt-4o"])


@pytest.fixture
def store(settings: Settings) -> Iterator[RequestStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield RequestStore(client, settings)
    client.close()


def test_prepare_builds_the_record(settings: Settings) -> None:
    p = prepare(req(priority="low", deadline_s=90_000, metadata={"a": 1}, temperature=0.1,
                    idempotency_key="k"), "acme", settings)
    rec = p.record
    assert rec.route == "batch" and rec.status == "queued" and rec.tenant == "acme"
    assert rec.model == "gpt-4o-mini" and rec.body["model"] == "gpt-4o-mini"
    assert rec.body["temperature"] == 0.1
    assert not {"priority", "deadline_s", "metadata", "idempotency_key"} & set(rec.body)
    assert rec.deadline_at == pytest.approx(rec.created_at + 90_000)
    assert rec.route_reason and rec.metadata == {"a": 1}
    assert len(rec.id) == 32 and rec.id != prepare(req(), "acme", settings).record.id


def test_prepare_refuses_with_the_field_named(settings: Settings) -> None:
    with pytest.raises(InvalidRequest) as not_allowed:
        prepare(req(model="other"), "acme", settings)
    assert not_allowed.value.param == "model"
    assert not_allowed.value.code == ErrorCode.MODEL_NOT_ALLOWED
    with pytest.raises(InvalidRequest) as stream_low:
        prepare(req(priority="low", stream=True), "acme", settings)
    assert stream_low.value.param == "stream"
    # A low request with a short deadline streams, so stream=true is fine there.
    assert prepare(req(priority="low", stream=True, deadline_s=5), "acme", settings).record.route == "stream"


def test_budget_caps_max_tokens(settings: Settings) -> None:
    stream = prepare(req(model="gpt-4o", max_cost_usd=Decimal("0.01")), "a", settings).record
    batch = prepare(req(model="gpt-4o", priority="low", max_cost_usd=Decimal("0.01")), "a",
                    settings).record
    assert batch.body["max_tokens"] > stream.body["max_tokens"] * 1.9
    lower = prepare(req(model="gpt-4o", max_tokens=10, max_cost_usd=Decimal("0.01")), "a", settings)
    assert lower.record.body["max_tokens"] == 10
    with pytest.raises(InvalidRequest) as tiny:
        prepare(req(model="gpt-4o", max_cost_usd=Decimal("0.000000001")), "a", settings)
    assert tiny.value.param == "max_cost_usd"


class RecordingDispatcher:
    """Records, at hand-over time, whether the record was already in Redis."""

    def __init__(self, store: RequestStore, fail: bool = False) -> None:
        self.store = store
        self.fail = fail
        self.seen: list[tuple[str, str | None]] = []

    def dispatch(self, request_id: str) -> None:
        record = self.store.get(request_id)
        self.seen.append((request_id, record.status if record else None))
        if self.fail:
            raise ConnectionError("broker down")


def test_record_is_stored_before_the_hand_over(settings: Settings, store: RequestStore) -> None:
    dispatcher = RecordingDispatcher(store)
    accepted = accept_sync(prepare(req(priority="high"), "acme", settings), store, dispatcher)
    assert dispatcher.seen == [(accepted.record.id, "dispatched")]
    low = accept_sync(prepare(req(priority="low"), "acme", settings), store, dispatcher)
    assert len(dispatcher.seen) == 1  # the batch lane needs no hand-over: the queue is the list
    assert store.redis.lrange(store.keys.pending("gpt-4o-mini"), 0, -1) == [low.record.id.encode()]


def test_failed_hand_over_fails_the_request(settings: Settings, store: RequestStore) -> None:
    with pytest.raises(Unavailable) as exc:
        accept_sync(prepare(req(priority="high"), "acme", settings), store,
                    RecordingDispatcher(store, fail=True))
    assert exc.value.code == ErrorCode.DISPATCH_UNAVAILABLE
    ids = [key for key in store.redis.scan_iter(match=f"{settings.key_prefix}:req:*")]
    assert len(ids) == 1
    assert store.redis.hget(ids[0], "status") == b"failed"


def test_idempotent_replay_and_conflict(settings: Settings, store: RequestStore) -> None:
    d = RecordingDispatcher(store)
    first = accept_sync(prepare(req(priority="low", idempotency_key="x"), "t", settings), store, d)
    again = accept_sync(prepare(req(priority="low", idempotency_key="x"), "t", settings), store, d)
    assert again.replay and again.record.id == first.record.id
    with pytest.raises(Conflict) as conflict:
        accept_sync(prepare(req(priority="high", idempotency_key="x"), "t", settings), store, d)
    assert conflict.value.code == ErrorCode.IDEMPOTENCY_CONFLICT and d.seen == []
