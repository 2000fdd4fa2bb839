"""The batch lane's script runners and per-result helpers, on a real Redis: `run_overlapped`
with several calls in flight, `run_pipelined` after Redis lost its scripts, `fetch_rows` over
many chunks, the latency tally against `timing_increments`, and the paused collector."""

from __future__ import annotations

import gc
import random
import uuid
from collections.abc import Callable

import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.lua import LuaScript
from hybrid_router.router.core.metrics import timing_increments
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.settings import Settings
from hybrid_router.workers.batch import claim as batch_claim
from hybrid_router.workers.batch.lua import run_overlapped, run_pipelined
from hybrid_router.workers.batch.writeback import LatencyTally, collector_paused

# Appends ARGV[1] to the list KEYS[1] and answers the list's new length and the value.
APPEND = LuaScript("""
local n = redis.call('RPUSH', KEYS[1], ARGV[1])
return {n, ARGV[1]}
""")


@pytest.fixture
def key(redis_client: redis.Redis) -> str:
    name = f"test:batch-lua:{uuid.uuid4().hex}"
    yield name
    redis_client.delete(name)


@pytest.mark.parametrize("depth", [1, 3])
def test_run_overlapped_answers_every_call_in_order(redis_client: redis.Redis, key: str,
                                                    depth: int) -> None:
    items = ((i, ([key], [f"v{i}"]) if i % 5 else None) for i in range(40))
    answers = list(run_overlapped(redis_client, APPEND, items, depth))
    assert [item for item, _ in answers] == list(range(40))
    assert all(answer is None for item, answer in answers if item % 5 == 0)
    sent = [answer for item, answer in answers if item % 5]
    assert [value for _n, value in sent] == [f"v{i}".encode() for i in range(40) if i % 5]
    assert [n for n, _value in sent] == list(range(1, len(sent) + 1))  # each ran once, in order
    assert redis_client.lrange(key, 0, -1) == [value for _n, value in sent]


def test_run_overlapped_runs_each_call_once_when_redis_lost_the_script(
        redis_client: redis.Redis, key: str) -> None:
    def items() -> object:
        for i in range(10):
            if i == 4:  # as if Redis restarted half-way: every later call is answered NOSCRIPT
                redis_client.script_flush()
            yield i, ([key], [f"v{i}"])

    answers = list(run_overlapped(redis_client, APPEND, items(), 3))  # type: ignore[arg-type]
    assert [item for item, _ in answers] == list(range(10))
    assert sorted(redis_client.lrange(key, 0, -1)) == sorted(f"v{i}".encode() for i in range(10))


def test_run_overlapped_stopped_early_leaves_the_client_usable(redis_client: redis.Redis,
                                                               key: str) -> None:
    answers = run_overlapped(redis_client, APPEND,
                             ((i, ([key], [f"v{i}"])) for i in range(20)), 3)
    assert next(answers)[0] == 0
    answers.close()  # replies of calls in flight are unread: that connection is dropped
    for _ in range(5):  # whichever pooled connection comes next answers its own command
        assert redis_client.ping() is True
    assert redis_client.echo("still in step") == b"still in step"


def test_run_pipelined_runs_many_calls_after_redis_lost_the_script(
        redis_client: redis.Redis, key: str) -> None:
    redis_client.script_flush()
    answers = run_pipelined(redis_client, APPEND, [([key], [f"v{i}"]) for i in range(50)])
    assert [n for n, _ in answers] == list(range(1, 51))
    assert redis_client.llen(key) == 50


def test_fetch_rows_reads_many_chunks_in_order(make_settings: Callable[..., Settings],
                                               redis_client: redis.Redis) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    ids = [uuid.uuid4().hex for _ in range(23)]
    for n, request_id in enumerate(ids):
        if n % 4 == 3:
            continue  # no record at all
        redis_client.hset(keys.record(request_id), mapping={
            "status": "queued", "model": f"m{n}", "body": f'{{"n":{n}}}',
            **({"deadline_at": str(1000.5 + n)} if n % 2 else {})})
    try:
        rows = list(batch_claim.fetch_rows(redis_client, keys, ids, chunk=5))
    finally:
        redis_client.delete(*[keys.record(i) for i in ids])
    assert [row.id for row in rows] == ids
    for n, row in enumerate(rows):
        if n % 4 == 3:
            assert (row.status, row.model, row.body_json, row.deadline_at) == (
                None, None, None, None)
            continue
        assert (row.status, row.model, row.body_json) == ("queued", f"m{n}",
                                                          f'{{"n":{n}}}'.encode())
        assert row.deadline_at == (1000.5 + n if n % 2 else None)


def test_latency_tally_adds_what_timing_increments_adds() -> None:
    rng = random.Random(7)
    tally = LatencyTally()
    expected: dict[str, int] = {}
    for _ in range(2000):
        status = rng.choice(["completed", "failed"])
        created = 1_700_000_000.0 + rng.random() * 10
        finished = created + rng.choice([0.0005, 0.02, 0.7, 3.0, 45.0, 900.0, 90_000.0]) \
            * rng.random()
        tally.observe(status, created, finished)  # type: ignore[arg-type]
        record = RequestRecord.model_construct(
            id="", tenant="", priority="low", route="batch", status=status, model="",
            created_at=0.0, finished_at=max(finished - created, 0.0))
        for name, amount in timing_increments(record).items():
            expected[name] = expected.get(name, 0) + amount
    assert tally.increments == expected


def test_collector_is_paused_for_the_write_and_restored_after() -> None:
    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner pause does not resume the outer one's
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a failed write")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is kept
    finally:
        gc.enable()
