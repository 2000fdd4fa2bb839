"""The workers' Celery application: the shared app (`core.celery_app`) plus the lanes.

`create_celery(settings)` builds it for any settings (tests use private prefixes; the CLI
builds one from the settings it has checked). ``celery -A hybrid_router.workers.celery_app``
finds the module's `app`, which is built on first access (module ``__getattr__``), not at
import: a module that imports this one builds no app and reads no settings, and a bad setting
stops ``celery -A hybrid_router.workers.celery_app ...`` with one line naming it (exit code 2),
like the CLI.

Every worker of an app gets the stream engine's bootstep (`workers.stream.bootstep`), which acts
only in a worker asked to consume the stream queue; logging goes through structlog
(`core.logs`) in any worker or beat started by Celery itself.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery, current_app
from celery.signals import setup_logging, worker_ready

from hybrid_router.router.core.celery_app import (
    FLUSH_TASK,
    POLL_TASK,
    build_celery,
    checked_settings,
)
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import configure_logging
from hybrid_router.router.core.runtime_config import beat_settings
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.schedule import PollSchedule, RuntimeFlushSchedule


def create_celery(settings: Settings) -> Celery:
    """The shared app with the lanes' tasks, the stream engine and beat's schedule."""
    app = build_celery(settings)
    app.conf.include = ["hybrid_router.workers.stream.tasks", "hybrid_router.workers.batch.tasks"]
    app.steps["worker"].add("hybrid_router.workers.stream.bootstep:StreamEngineStep")
    batch_q = Keys(settings.key_prefix).batch_queue()
    # Housekeeping is sent only when it has something to do (Flower lists what was sent).
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
    return app


@worker_ready.connect
def _freeze_startup_objects(**_: object) -> None:
    """Move the worker's long-lived startup objects out of the garbage collector's reach, so
    full collections (pauses every thread of the pool) stay short while streams are relayed."""
    gc.collect()
    gc.freeze()


@setup_logging.connect
def _structlog(**_: object) -> None:
    """A worker or beat started by Celery itself (``celery -A hybrid_router.workers.celery_app
    worker``) logs through structlog like the CLI's (connecting here also keeps Celery's own
    logging setup off); a no-op where the CLI configured it already."""
    settings = getattr(current_app.conf, "hr_settings", None)
    if isinstance(settings, Settings):
        configure_logging(settings)


def __getattr__(name: str) -> Any:
    """``app``: the application of the configured settings, built on first access."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = globals().get("_app")
    if built is None:
        built = globals()["_app"] = create_celery(checked_settings())
    return built
