"""Beat sends the batch lane's housekeeping only when it has work (Flower lists every task
sent): the flush while something waits to be flushed or settled, the poll while batches are in
flight or a queued deadline needs watching. Real Redis; then a real beat process."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis

from hybrid_router.router.core.celery_app import FLUSH_TASK, POLL_TASK
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.records import now
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.schedule import PollSchedule, RuntimeFlushSchedule
from hybrid_router.workers.celery_app import create_celery
from hybrid_router.workers.stream.engine import parse_task_message
from tests.support import Stack, wait_until

LONG_AGO = datetime.now(UTC) - timedelta(hours=1)


def flush_schedule(settings: Settings) -> RuntimeFlushSchedule:
    return RuntimeFlushSchedule(settings.redis_url, settings.key_prefix, 1.0, 5)


def poll_schedule(settings: Settings) -> PollSchedule:
    return PollSchedule(settings.redis_url, settings.key_prefix, 1.0, 60.0, 3600.0)


def test_the_flush_is_due_only_with_something_to_flush_or_settle(
        settings: Settings, redis_client: redis.Redis) -> None:
    keys = Keys(settings.key_prefix)
    schedule = flush_schedule(settings)
    assert not schedule.is_due(LONG_AGO).is_due  # nothing at all
    redis_client.sadd(keys.pending_models(), "m")
    assert not schedule.is_due(LONG_AGO).is_due  # a model whose queue is empty
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("a queued request", lambda: redis_client.rpush(keys.pending("m"), "r1"),
         lambda: redis_client.delete(keys.pending("m"))),
        ("an orphaned claim", lambda: redis_client.zadd(keys.claims(), {"flush-1": 1.0}),
         lambda: redis_client.delete(keys.claims())),
        ("an upload watched for late twins",
         lambda: redis_client.zadd(keys.late_twin_watch(), {"[]": now() + 60}),
         lambda: redis_client.delete(keys.late_twin_watch())),
    ]
    for what, add, remove in cases:
        add()
        assert schedule.is_due(LONG_AGO).is_due, what
        assert not schedule.is_due(datetime.now(UTC)).is_due, f"{what}: interval"
        remove()
        assert not schedule.is_due(LONG_AGO).is_due, f"{what} gone"
    # A queue over the early threshold is flushed without waiting for the interval.
    redis_client.rpush(keys.pending("m"), *[f"r{i}" for i in range(5)])
    assert schedule.is_due(datetime.now(UTC)).is_due


def test_the_poll_is_due_only_while_batches_are_in_flight_or_a_deadline_is_near(
        settings: Settings, redis_client: redis.Redis) -> None:
    keys = Keys(settings.key_prefix)
    schedule = poll_schedule(settings)
    assert not schedule.is_due(LONG_AGO).is_due
    redis_client.zadd(keys.batches_in_flight(), {"batch_1": now()})
    assert schedule.is_due(LONG_AGO).is_due
    assert not schedule.is_due(datetime.now(UTC)).is_due  # not before the interval
    redis_client.delete(keys.batches_in_flight())
    redis_client.zadd(keys.batch_deadlines(), {"far": now() + 3 * 3600})
    assert not schedule.is_due(LONG_AGO).is_due  # the poll will not need to escalate it yet
    redis_client.zadd(keys.batch_deadlines(), {"near": now() + 600})
    assert schedule.is_due(LONG_AGO).is_due


def test_beat_sends_no_housekeeping_until_there_is_some(
        make_settings: Callable[..., Settings], stack_factory: Callable[[Settings], Stack],
        redis_client: redis.Redis) -> None:
    """A real beat with short intervals: ticks pass with nothing sent to the batch queue; a
    queued low request brings a flush, a batch in flight a poll."""
    settings = make_settings(flush_interval_s=0.2, poll_interval_s=0.2)
    keys = Keys(settings.key_prefix)
    batch_list = keys.celery_prefix() + keys.batch_queue()
    app = create_celery(settings)
    assert isinstance(app.conf.beat_schedule["batch-poll"]["schedule"], PollSchedule)
    assert isinstance(app.conf.beat_schedule["batch-flush"]["schedule"], RuntimeFlushSchedule)

    def zcard_calls() -> int:
        return int(redis_client.info("commandstats").get("cmdstat_zcard", {}).get("calls", 0))

    stack_factory(settings).start_beat()
    # Each tick of the two schedules asks Redis (ZCARD) whether there is work: wait for ticks.
    start = zcard_calls()
    wait_until(lambda: zcard_calls() >= start + 8, 20, 0.1, message="beat ticked a few times")
    assert redis_client.llen(batch_list) == 0

    def sent() -> list[str]:
        return [parse_task_message(m)[0] for m in redis_client.lrange(batch_list, 0, -1)]

    redis_client.sadd(keys.pending_models(), "m")
    redis_client.rpush(keys.pending("m"), "r1")
    wait_until(lambda: FLUSH_TASK in sent(), 10, 0.1, message="a flush sent")
    assert POLL_TASK not in sent()
    redis_client.zadd(keys.batches_in_flight(), {"batch_1": now()})
    wait_until(lambda: POLL_TASK in sent(), 10, 0.1, message="a poll sent")
