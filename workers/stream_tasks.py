"""Stream-lane Celery tasks: thin wrappers over `workers.streaming` and `workers.stream_sweep`.

``hr.stream.run`` messages are normally taken off the stream queue by the worker's stream
engine (`workers.stream_engine`), not by Celery's consumer; this task exists so that any Celery
worker consuming the stream queue runs them the same way: the task body runs the stream on the
process's engine and waits for its outcome. ``hr.stream.sweep`` runs on Celery's own consumer
(the stream lane's control queue).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, shared_task

from router.keys import Keys
from workers.callbacks import schedule_callback
from workers.celery_app import STREAM_SWEEP_TASK, STREAM_TASK, settings_of
from workers.stream_context import StreamContext, context_for
from workers.stream_sweep import sweep_streams
from workers.streaming import run_stream


def app_stream_context(app: Celery) -> StreamContext:
    """The process's stream context, with terminal callbacks sent through `app`."""
    ctx = context_for(settings_of(app))
    ctx.notify = lambda request_id: schedule_callback(app, request_id)
    return ctx


@shared_task(name=STREAM_TASK, bind=True, acks_late=True, ignore_result=True)
def run(self: Any, request_id: str) -> str:
    """Stream one request (args: [request_id])."""
    return run_stream(request_id, app_stream_context(self.app))


@shared_task(name=STREAM_SWEEP_TASK, bind=True, ignore_result=True)
def sweep(self: Any) -> dict[str, int]:
    """End streams whose worker died; send again requests never picked up."""
    settings = settings_of(self.app)
    queue = Keys(settings.key_prefix).stream_queue()

    def redispatch(request_id: str) -> None:
        self.app.send_task(STREAM_TASK, args=[request_id], task_id=request_id, queue=queue,
                           routing_key=queue)

    report = sweep_streams(app_stream_context(self.app), redispatch)
    return {"worker_lost": report.worker_lost, "redispatched": report.redispatched,
            "cleaned": report.cleaned}
