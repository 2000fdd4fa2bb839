"""Celery task messages built ahead of time, so the intake can enqueue atomically.

The intake writes a stream request's record, its `accepted` event and its Celery task message
in ONE Lua script (router.lua CREATE). That closes the window in which a record could exist
without a task (a crash between two writes), and it takes the Celery publish (a producer
checkout, a routing-table lookup and a thread hop) off the latency path of every high request.

The message is exactly what ``app.send_task(name, args, queue=q, routing_key=q)`` puts on the
Redis list: Celery builds the headers and body (task protocol 2, `app.amqp.as_task_v2`), kombu
serialises the body, and the envelope is kombu's Redis-transport envelope for the default
(anonymous) exchange, routed straight to the queue's list.
"""

from __future__ import annotations

import base64
import uuid

import orjson
from celery import Celery
from kombu.serialization import dumps as kombu_dumps

from router.keys import Keys
from workers.celery_app import settings_of


class CeleryMessageBuilder:
    """Builds `(redis list key, message JSON)` for a task on one queue of `app`."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue
        self.list_key = Keys(settings_of(app).key_prefix).celery_prefix() + queue

    def build(self, task_name: str, args: list[str]) -> tuple[str, str]:
        task_id = str(uuid.uuid4())
        message = self.app.amqp.as_task_v2(task_id, task_name, args=args, kwargs={})
        content_type, content_encoding, body = kombu_dumps(message.body, serializer="json")
        raw = body.encode() if isinstance(body, str) else body
        envelope = {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": message.headers,
            "properties": {
                **message.properties,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return self.list_key, orjson.dumps(envelope).decode()
