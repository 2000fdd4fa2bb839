"""Handing accepted stream requests to the Celery stream queue.

A stream's Celery task id is its request id, so the id Flower and ``celery inspect`` show is
the one ``GET /v1/requests/{id}`` reads, and ``celery control revoke <request id>`` reaches it.
"""

from __future__ import annotations

import threading

from celery import Celery

from hybrid_router.router.core.celery_app import STREAM_TASK, settings_of
from hybrid_router.router.core.celery_message import CeleryMessageBuilder
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.task_events import TaskEvents, celery_event_sink

# How long the intake gathers `task-sent` events into one publish. Each publish (kombu's
# producer, one Redis PUBLISH from a thread of its own) cost ~250 us of the API's CPU, which at
# 50 ms and 110 streams a second was about a twentieth of the API's CPU per stream; Flower
# shows a backlog a quarter of a second later instead.
TASK_SENT_BATCH_S = 0.25


class CeleryStreamDispatcher:
    """`hybrid_router.router.core.intake.StreamDispatcher` that sends the stream task (the message is in Redis on
    return, so a request is never acknowledged to a client before its lane has it)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue = Keys(settings_of(app).key_prefix).stream_queue()
        self.messages = CeleryMessageBuilder(app, self.queue)
        self._events: TaskEvents | None = None
        self._events_lock = threading.Lock()

    def task_message(self, request_id: str) -> tuple[str, str]:
        """The stream task's message for `request_id`, for the intake's atomic create."""
        return self.messages.build(STREAM_TASK, [request_id], task_id=request_id)

    def task_sent(self, request_id: str) -> None:
        """Announce a message written by the intake's create as Celery's ``task-sent`` event
        (what `send_task` would have published), so Flower shows a backlog of streams. Queued
        for a thread of its own: the intake only puts it on a queue."""
        events = self._events
        if events is None:
            with self._events_lock:
                if self._events is None:
                    self._events = TaskEvents(celery_event_sink(self.app), "task-sent-events",
                                              TASK_SENT_BATCH_S)
                events = self._events
        events.send("task-sent", uuid=request_id, root_id=request_id, parent_id=None,
                    name=STREAM_TASK, args=repr([request_id]), kwargs="{}", retries=0,
                    eta=None, expires=None, queue=self.queue, exchange="",
                    routing_key=self.queue)

    def dispatch(self, request_id: str) -> None:
        self.app.send_task(STREAM_TASK, args=[request_id], task_id=request_id, queue=self.queue,
                           routing_key=self.queue, retry=True)

    def close(self) -> None:
        """Send the events still queued (at the intake's shutdown)."""
        if self._events is not None:
            self._events.close()
