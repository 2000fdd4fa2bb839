"""Stream-lane Celery tasks: a thin wrapper over `hybrid_router.workers.stream.relay`.

``hr.stream.run`` messages are normally taken off the stream queue by the worker's stream
engine (`hybrid_router.workers.stream.engine`), not by Celery's consumer; this task exists so that any Celery
worker consuming the stream queue runs them the same way: the task body runs the stream on the
process's engine and waits for its outcome. The stream sweep is no task: every stream engine
runs it (`hybrid_router.workers.stream.sweep`).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, shared_task

from hybrid_router.router.core.celery_app import STREAM_TASK, send_callback, settings_of
from hybrid_router.router.core.keys import Keys
from hybrid_router.workers.stream.context import StreamContext, context_for
from hybrid_router.workers.stream.relay import run_stream


def app_stream_context(app: Celery) -> StreamContext:
    """The process's stream context, with terminal callbacks and redispatches sent through
    `app`."""
    ctx = context_for(settings_of(app))
    queue = Keys(ctx.settings.key_prefix).stream_queue()
    ctx.notify = lambda request_id: send_callback(app, request_id)

    def redispatch(request_id: str) -> None:
        app.send_task(STREAM_TASK, args=[request_id], queue=queue, routing_key=queue,
                      task_id=request_id)

    ctx.redispatch = redispatch
    return ctx


@shared_task(name=STREAM_TASK, bind=True, acks_late=True, ignore_result=True)
def run(self: Any, request_id: str) -> str:
    """Stream one request (args: [request_id])."""
    return run_stream(request_id, app_stream_context(self.app))
