"""The stream lane's Celery worker: a Celery worker process whose stream engine takes the
stream queue.

``hybrid-router worker --lane stream`` runs a Celery worker (remote control, ``ping``, task
events, Flower, warm shutdown) that consumes only the stream lane's control queue (the sweep);
a worker bootstep starts the process's `workers.stream_engine.StreamEngine` on the stream queue
and stops it on shutdown, after its running streams ended.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps

from router.keys import Keys
from router.logs import get_logger
from workers.celery_app import settings_of
from workers.stream_engine import EventSink
from workers.stream_tasks import app_stream_context

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 60.0


def celery_event_sink(app: Celery, hostname: str) -> EventSink:
    """Sends Celery task events as worker `hostname`: each batch is buffered by Celery's own
    dispatcher and published as one ``task.multi`` message (one Redis round trip; Celery's
    event receiver, hence Flower, reads such lists). One dispatcher, made on first use and
    again after a failure."""
    dispatcher: Any = None

    def send(events: list[tuple[str, dict[str, Any]]]) -> None:
        nonlocal dispatcher
        if dispatcher is None:
            dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname=hostname,
                                               enabled=True, buffer_group={"task"},
                                               buffer_limit=1_000_000)
        try:
            for event_type, fields in events:
                dispatcher.send(event_type, **fields)
            dispatcher.flush(errors=False)
        except Exception:
            dispatcher = None
            raise

    return send


class StreamEngineStep(bootsteps.StartStopStep):
    """Starts the stream engine's consumer with the worker, drains it at shutdown."""

    def start(self, worker: Any) -> None:
        app: Celery = worker.app
        keys = Keys(settings_of(app).key_prefix)
        engine = app_stream_context(app).engine
        engine.consume(keys.celery_prefix() + keys.stream_queue(),
                       keys.celery_prefix() + keys.stream_control_queue(),
                       celery_event_sink(app, worker.hostname))
        log.info("stream engine consuming", queue=keys.stream_queue(),
                 max_streams=engine.max_streams)

    def stop(self, worker: Any) -> None:
        app_stream_context(worker.app).engine.stop(SHUTDOWN_GRACE_S)


def install(app: Celery) -> None:
    """Add the stream engine to the workers `app` starts (call before ``worker_main``)."""
    app.steps["worker"].add(StreamEngineStep)
