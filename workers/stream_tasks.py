"""Stream-lane Celery tasks: thin wrappers over `workers.streaming` and `workers.stream_sweep`.

Why the **threads** pool (``hybrid-router worker --lane stream``, ``-P threads``, concurrency
``Settings.stream_worker_concurrency``) rather than gevent: a stream is I/O-bound (a thread
spends its life blocked in ``recv`` on the upstream socket, with the GIL released), and a few
hundred OS threads per process are cheap. Threads need no monkey-patching, so the official
openai SDK, httpx and redis-py run exactly as they do everywhere else, and the per-process
publisher and lease threads are ordinary threads. gevent would allow thousands of streams per
process, but only if every library cooperates with its patching; when one does not, a single
blocking call stalls every stream of the process. Scale out with more worker processes instead.

The threads pool ignores Celery's ``time_limit``/``soft_time_limit``; the idle and total
timeouts are enforced inside `workers.streaming.run_stream`.
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


def _context(app: Celery) -> StreamContext:
    """The process's stream context, with terminal callbacks sent through `app`."""
    ctx = context_for(settings_of(app))
    ctx.notify = lambda request_id: schedule_callback(app, request_id)
    return ctx


@shared_task(name=STREAM_TASK, bind=True, acks_late=True, ignore_result=True)
def run(self: Any, request_id: str) -> str:
    """Stream one request (args: [request_id])."""
    return run_stream(request_id, _context(self.app))


@shared_task(name=STREAM_SWEEP_TASK, bind=True, ignore_result=True)
def sweep(self: Any) -> dict[str, int]:
    """End streams whose worker died; send again requests never picked up."""
    settings = settings_of(self.app)
    queue = Keys(settings.key_prefix).stream_queue()

    def redispatch(request_id: str) -> None:
        self.app.send_task(STREAM_TASK, args=[request_id], queue=queue, routing_key=queue)

    report = sweep_streams(_context(self.app), redispatch)
    return {"worker_lost": report.worker_lost, "redispatched": report.redispatched,
            "cleaned": report.cleaned}
