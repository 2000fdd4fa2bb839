"""The Celery application, configured from `Settings` (broker, queues, routes, events).

`create_celery(settings)` builds an app for any settings (tests use private prefixes);
the module-level `app` is what ``celery -A workers.celery_app`` and the CLI run.
"""

from __future__ import annotations

import gc

from celery import Celery
from celery.signals import worker_ready
from kombu import Queue

from router.keys import Keys
from settings import Settings, get_settings

# Task names: Flower shows these; the beat schedule and dispatchers refer to them.
STREAM_TASK = "hr.stream.run"
FLUSH_TASK = "hr.batch.flush"
POLL_TASK = "hr.batch.poll"


def create_celery(settings: Settings) -> Celery:
    keys = Keys(settings.key_prefix)
    app = Celery(
        "hybrid-router",
        broker=settings.redis_url,
        include=["workers.stream_tasks", "workers.batch_tasks"],
    )
    stream_q, batch_q = keys.stream_queue(), keys.batch_queue()
    control_q = keys.stream_control_queue()
    app.conf.update(
        task_queues=(Queue(stream_q, routing_key=stream_q), Queue(batch_q, routing_key=batch_q),
                     Queue(control_q, routing_key=control_q)),
        task_default_queue=stream_q,
        task_routes={"hr.stream.*": {"queue": stream_q},
                     "hr.batch.*": {"queue": batch_q}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # At-least-once delivery: a task is acknowledged after it ran, and redelivered if its
        # worker dies. Each task is idempotent through the request state machine and leases.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Flower and `celery events` see every task of both lanes.
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": keys.celery_prefix(),
            "visibility_timeout": int(settings.stream_total_timeout_s) + 300,
        },
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.05,
                                   "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        timezone="UTC",
    )
    # The flush entry may be replaced by a schedule that reads the runtime flush interval.
    from workers.batch_schedule import RuntimeFlushSchedule

    flush_schedule = RuntimeFlushSchedule(settings.redis_url, settings.key_prefix,
                                          settings.flush_interval_s,
                                          settings.flush_early_threshold)
    app.conf.beat_schedule = {
        "batch-flush": {"task": FLUSH_TASK, "schedule": flush_schedule,
                        "options": {"queue": batch_q, "expires": settings.flush_interval_s}},
        "batch-poll": {"task": POLL_TASK, "schedule": settings.poll_interval_s,
                       "options": {"queue": batch_q, "expires": settings.poll_interval_s}},
    }
    app.conf.hr_settings = settings
    return app


@worker_ready.connect
def _freeze_startup_objects(**_: object) -> None:
    """Move the worker's long-lived startup objects out of the garbage collector's reach, so
    full collections (pauses every thread of the pool) stay short while streams are relayed."""
    gc.collect()
    gc.freeze()


def settings_of(app: Celery) -> Settings:
    """The `Settings` an app was built from (tasks read their configuration here)."""
    settings: Settings = app.conf.hr_settings
    return settings


app = create_celery(get_settings())
