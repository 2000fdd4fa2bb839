"""The stream lane's Celery worker: a Celery worker process whose stream engine takes the
stream queue.

Every worker of the app gets `StreamEngineStep` (`hybrid_router.workers.celery_app.create_celery` adds it),
and it acts in the workers that are asked to consume the stream queue: ``hybrid-router worker
--lane stream`` and Celery's own ``celery -A hybrid_router.workers.celery_app worker -Q <prefix>.stream``
(or a worker with no ``-Q``, which consumes every queue) run the lane the same way. The step
takes the stream queue away from Celery's consumer and gives it the lane's control queue
instead (the sweep and other tasks forwarded there); the process's
`hybrid_router.workers.stream.engine.StreamEngine` takes the stream queue, starting with the worker and
draining on shutdown, after its running streams ended.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps

from hybrid_router.router.core.celery_app import settings_of
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.task_events import celery_event_sink
from hybrid_router.workers.stream.tasks import app_stream_context

log = get_logger(__name__)

SHUTDOWN_GRACE_S = 60.0


class StreamEngineStep(bootsteps.StartStopStep):
    """Runs the stream engine in a worker that consumes the stream queue (see the module doc)."""

    # After the pool: a prefork pool forks its children before the engine's thread exists.
    requires = ("celery.worker.components:Pool",)

    def include_if(self, worker: Any) -> bool:
        app: Celery = worker.app
        return Keys(settings_of(app).key_prefix).stream_queue() in app.amqp.queues.consume_from

    def create(self, worker: Any) -> None:
        """Celery's consumer takes the control queue instead of the stream queue (the queue
        selection is read when the consumer starts, after the steps are created)."""
        app: Celery = worker.app
        keys = Keys(settings_of(app).key_prefix)
        queues = app.amqp.queues
        queues.deselect([keys.stream_queue()])
        queues.select_add(queues[keys.stream_control_queue()])

    def start(self, worker: Any) -> None:
        app: Celery = worker.app
        keys = Keys(settings_of(app).key_prefix)
        engine = app_stream_context(app).engine
        engine.consume(keys.celery_prefix() + keys.stream_queue(),
                       keys.celery_prefix() + keys.stream_control_queue(),
                       celery_event_sink(app, worker.hostname), worker.hostname)
        log.info("stream engine consuming", queue=keys.stream_queue(),
                 max_streams=engine.max_streams)

    def stop(self, worker: Any) -> None:
        app_stream_context(worker.app).engine.stop(SHUTDOWN_GRACE_S)
