"""The Celery application, configured from `Settings` (broker, queues, routes, events).

`create_celery(settings)` builds an app for any settings (tests use private prefixes; the CLI
builds one from the settings it has checked). ``celery -A hybrid_router.workers.celery_app`` finds the
module's `app`, which is built on first access (module ``__getattr__``), not at import: a
module that imports this one builds no app and reads no settings, and a bad setting stops
``celery -A hybrid_router.workers.celery_app ...`` with one line naming it (exit code 2), like the CLI.

Every worker of an app gets the stream engine's bootstep (`hybrid_router.workers.stream.bootstep`), which acts
only in a worker asked to consume the stream queue; logging goes through structlog
(`hybrid_router.router.core.logs`) in any worker or beat started by Celery itself.
"""

from __future__ import annotations

import gc
import sys
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, current_app
from celery.signals import setup_logging, worker_ready
from kombu import Queue

from hybrid_router.router.core.broker_transport import SCHEMES, TRANSPORT
from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings, get_settings
from hybrid_router.settings.config import describe_settings_error

# Task names: Flower shows these; the beat schedule and dispatchers refer to them.
STREAM_TASK = "hr.stream.run"
FLUSH_TASK = "hr.batch.flush"
POLL_TASK = "hr.batch.poll"


def create_celery(settings: Settings) -> Celery:
    keys = Keys(settings.key_prefix)
    app = Celery(
        "hybrid-router",
        broker=settings.redis_url,
        include=["hybrid_router.workers.stream.tasks", "hybrid_router.workers.batch.tasks"],
    )
    app.steps["worker"].add("hybrid_router.workers.stream.bootstep:StreamEngineStep")
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
        broker_transport=(TRANSPORT if urlsplit(settings.redis_url).scheme in SCHEMES
                          else None),
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
    # Housekeeping is sent only when it has something to do (Flower lists what was sent).
    from hybrid_router.router.core.runtime_config import beat_settings
    from hybrid_router.workers.batch.schedule import PollSchedule, RuntimeFlushSchedule

    flush_schedule = RuntimeFlushSchedule(settings.redis_url, settings.key_prefix,
                                          settings.flush_interval_s,
                                          settings.flush_early_threshold,
                                          report=beat_settings(settings))
    poll_schedule = PollSchedule(settings.redis_url, settings.key_prefix,
                                 settings.poll_interval_s, settings.flush_interval_s,
                                 settings.expected_batch_turnaround_s)
    app.conf.beat_schedule = {
        "batch-flush": {"task": FLUSH_TASK, "schedule": flush_schedule,
                        "options": {"queue": batch_q, "expires": settings.flush_interval_s}},
        "batch-poll": {"task": POLL_TASK, "schedule": poll_schedule,
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


@setup_logging.connect
def _structlog(**_: object) -> None:
    """A worker or beat started by Celery itself (``celery -A hybrid_router.workers.celery_app worker``) logs
    through structlog like the CLI's (connecting here also keeps Celery's own logging setup
    off); a no-op where the CLI configured it already."""
    settings = getattr(current_app.conf, "hr_settings", None)
    if isinstance(settings, Settings):
        from hybrid_router.router.core.logs import configure_logging

        configure_logging(settings)


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


def __getattr__(name: str) -> Any:
    """``app``: the application of the configured settings, built on first access."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals().get("_app")
    if built is None:
        built = globals()["_app"] = create_celery(checked_settings())
    return built
