"""Batch-lane Celery tasks: thin wrappers over the plain functions of the batch modules.

    hr.batch.flush       beat (runtime interval / early): `hybrid_router.workers.batch.flush.flush`
    hr.batch.poll        beat (poll interval): `hybrid_router.workers.batch.poll.poll` (+ deadline checks)
    hr.batch.emulated    one emulated batch: `hybrid_router.workers.batch.emulated.run_emulated_batch`
    hr.batch.callback    one terminal callback: `hybrid_router.workers.callbacks.run_callback`
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import redis
from celery import Celery, shared_task

from hybrid_router.router.core.celery_app import CALLBACK_TASK, FLUSH_TASK, POLL_TASK, send_callback, settings_of
from hybrid_router.router.core.dispatch import CeleryStreamDispatcher
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.emulated import run_emulated_batch
from hybrid_router.workers.batch.flush import FlushContext, flush
from hybrid_router.workers.batch.poll import PollContext, poll
from hybrid_router.workers.callbacks import run_callback
from hybrid_router.workers.upstream.base import make_openai_client

EMULATED_TASK = "hr.batch.emulated"


@dataclass
class BatchResources:
    """Clients shared by the tasks of one worker process (built on first use)."""

    settings: Settings
    redis: redis.Redis
    upstream: openai.OpenAI
    http: httpx.Client


_resources: dict[int, BatchResources] = {}
_lock = threading.Lock()


def resources_for(app: Celery) -> BatchResources:
    with _lock:
        found = _resources.get(id(app))
        if found is None:
            settings = settings_of(app)
            found = BatchResources(
                settings,
                sync_client(settings.redis_url, health_check_interval=30),
                make_openai_client(settings, max_retries=2),
                httpx.Client(),
            )
            _resources[id(app)] = found
        return found


def send_emulated(app: Celery, batch_id: str) -> None:
    queue = Keys(settings_of(app).key_prefix).batch_queue()
    app.send_task(EMULATED_TASK, args=[batch_id], queue=queue, routing_key=queue, retry=True)


def _hooks(app: Celery) -> dict[str, Any]:
    dispatcher = CeleryStreamDispatcher(app)
    return {
        "notify": lambda request_id: send_callback(app, request_id),
        "dispatch_stream": dispatcher.dispatch,
        "send_emulated": lambda batch_id: send_emulated(app, batch_id),
    }


@shared_task(name=FLUSH_TASK, bind=True, ignore_result=True)
def flush_task(self: Any) -> dict[str, Any]:
    """Flush every model's pending queue into batches (one flush at a time)."""
    res = resources_for(self.app)
    report = flush(FlushContext(res.settings, res.redis, res.upstream, **_hooks(self.app)))
    return {"flush_id": report.flush_id, "ran": report.ran, "submitted": report.submitted,
            "batches": len(report.batches), "error": report.error}


@shared_task(name=POLL_TASK, bind=True, ignore_result=True)
def poll_task(self: Any) -> dict[str, Any]:
    """Follow batches in flight; write back those that ended; escalate near deadlines."""
    res = resources_for(self.app)
    report = poll(PollContext(res.settings, res.redis, res.upstream, **_hooks(self.app)))
    return {"ran": report.ran, "checked": report.checked, "finished": report.finished,
            "escalated": report.escalated}


@shared_task(name=EMULATED_TASK, bind=True, acks_late=True, ignore_result=True)
def emulated_task(self: Any, batch_id: str) -> dict[str, int]:
    """Run one emulated batch as ordinary completions (args: [batch_id])."""
    res = resources_for(self.app)
    report = run_emulated_batch(res.settings, res.redis, res.upstream, batch_id,
                                notify=lambda rid: send_callback(self.app, rid))
    return {"completed": report.completed, "failed": report.failed,
            "requeued": report.requeued}


@shared_task(name=CALLBACK_TASK, bind=True, ignore_result=True)
def callback_task(self: Any, request_id: str, attempt: int = 1) -> str:
    """POST a terminal record to its callback_url (args: [request_id, attempt])."""
    res = resources_for(self.app)
    return run_callback(self.app, res.settings, res.redis, res.http, request_id, attempt).outcome
