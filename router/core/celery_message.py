"""Celery task messages built ahead of time, so the intake can enqueue atomically.

The intake writes a stream request's record, its `accepted` event and its Celery task message
in ONE Lua script (hybrid_router.router.core.lua CREATE). That closes the window in which a record could exist
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
from dataclasses import dataclass
from typing import Any

import orjson
from celery import Celery
from kombu.serialization import dumps as kombu_dumps

from hybrid_router.router.core.celery_app import settings_of
from hybrid_router.router.core.keys import Keys


class CeleryMessageBuilder:
    """Builds `(redis list key, message JSON)` for a task on one queue of `app`."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue
        self.list_key = Keys(settings_of(app).key_prefix).celery_prefix() + queue
        self._templates: dict[str, _Template] = {}

    def build(self, task_name: str, args: list[str], task_id: str | None = None
              ) -> tuple[str, str]:
        task_id = task_id or str(uuid.uuid4())
        template = self._templates.get(task_name) or self._template(task_name)
        body = [args, {}, template.embed]
        envelope = {
            **template.envelope,
            "body": base64.b64encode(orjson.dumps(body)).decode(),
            "headers": {**template.headers, "id": task_id, "root_id": task_id,
                        "argsrepr": repr(args)},
            "properties": {**template.properties, "correlation_id": task_id,
                           "delivery_tag": str(uuid.uuid4())},
        }
        return self.list_key, orjson.dumps(envelope).decode()

    def _template(self, task_name: str) -> _Template:
        """Celery's own message for `task_name` (`app.amqp.as_task_v2`, kombu's serialiser),
        built once; `build` only swaps in the id, the args and a delivery tag."""
        placeholder = str(uuid.uuid4())
        message = self.app.amqp.as_task_v2(placeholder, task_name, args=(), kwargs={})
        content_type, content_encoding, _body = kombu_dumps(message.body, serializer="json")
        template = _Template(
            envelope={"content-encoding": content_encoding, "content-type": content_type},
            headers=dict(message.headers),
            properties={**message.properties, "delivery_mode": 2,
                        "delivery_info": {"exchange": "", "routing_key": self.queue},
                        "priority": 0, "body_encoding": "base64"},
            embed=message.body[2],
        )
        self._templates[task_name] = template
        return template


@dataclass(frozen=True)
class _Template:
    envelope: dict[str, Any]
    headers: dict[str, Any]
    properties: dict[str, Any]
    embed: dict[str, Any]
