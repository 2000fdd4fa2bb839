"""Handing accepted stream requests to the Celery stream queue."""

from __future__ import annotations

from celery import Celery

from router.keys import Keys
from workers.celery_app import STREAM_TASK, settings_of
from workers.celery_message import CeleryMessageBuilder


class CeleryStreamDispatcher:
    """`router.intake.StreamDispatcher` that sends the stream task (the message is in Redis on
    return, so a request is never acknowledged to a client before its lane has it)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.queue = Keys(settings_of(app).key_prefix).stream_queue()
        self.messages = CeleryMessageBuilder(app, self.queue)

    def task_message(self, request_id: str) -> tuple[str, str]:
        """The stream task's message for `request_id`, for the intake's atomic create."""
        return self.messages.build(STREAM_TASK, [request_id])

    def dispatch(self, request_id: str) -> None:
        self.app.send_task(STREAM_TASK, args=[request_id], queue=self.queue,
                           routing_key=self.queue, retry=True)
