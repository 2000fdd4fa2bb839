"""The Celery application every process shares: broker, queues, routes, task names, events.

The API and the Python client only send messages (the stream task, a flush, a callback); the
workers also run them. `build_celery(settings)` is what both share; the workers' app
(`hybrid_router.workers.celery_app.create_celery`) adds the lanes' tasks, the stream engine's
bootstep and beat's schedule to it, so the sending side never imports a lane.
"""

from __future__ import annotations

import sys

from celery import Celery
from kombu import Queue

from hybrid_router.router.core.broker_transport import transport_for
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import redis_target
from hybrid_router.settings import Settings, get_settings
from hybrid_router.settings.config import describe_settings_error

# Task names: Flower shows these; the beat schedule and dispatchers refer to them.
STREAM_TASK = "hr.stream.run"
FLUSH_TASK = "hr.batch.flush"
POLL_TASK = "hr.batch.poll"
CALLBACK_TASK = "hr.batch.callback"


def build_celery(settings: Settings) -> Celery:
    """An app configured for `settings`: enough to send any of the router's tasks."""
    keys = Keys(settings.key_prefix)
    # Behind Sentinel: kombu's ``sentinel://`` transport, told the master's name.
    broker_url, broker_options, broker_tls = redis_target(settings.redis_url).broker()
    app = Celery("hybrid-router", broker=broker_url)
    stream_q, batch_q = keys.stream_queue(), keys.batch_queue()
    control_q = keys.stream_control_queue()
    app.conf.update(
        task_queues=(Queue(stream_q, routing_key=stream_q), Queue(batch_q, routing_key=batch_q),
                     Queue(control_q, routing_key=control_q)),
        task_default_queue=stream_q,
        task_routes={"hr.stream.*": {"queue": stream_q},
                     "hr.batch.*": {"queue": batch_q}},
        # kombu's Redis transport with a guard against a kombu defect that made a worker exit
        # when Redis went away under a running task (hybrid_router.router.core.broker_transport).
        broker_transport=transport_for(settings.redis_url),
        broker_use_ssl=broker_tls,
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
            **broker_options,
        },
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.05,
                                   "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
        timezone="UTC",
    )
    app.conf.hr_settings = settings
    return app


def settings_of(app: Celery) -> Settings:
    """The `Settings` an app was built from (tasks read their configuration here)."""
    settings: Settings = app.conf.hr_settings
    return settings


def checked_settings() -> Settings:
    """`get_settings()`, or one line naming the bad setting and exit code 2."""
    try:
        return get_settings()
    except Exception as exc:
        print(f"hybrid-router: invalid configuration: {describe_settings_error(exc)}",
              file=sys.stderr)
        raise SystemExit(2) from None


def send_callback(app: Celery, request_id: str, attempt: int = 1, countdown: float = 0.0) -> None:
    """Send the task that POSTs the terminal record of `request_id` to its callback_url."""
    queue = Keys(settings_of(app).key_prefix).batch_queue()
    app.send_task(CALLBACK_TASK, args=[request_id, attempt], queue=queue, routing_key=queue,
                  countdown=countdown or None, retry=True)
