"""Helpers shared by the batch-lane tests: accept low requests, read records and events."""

from __future__ import annotations

from typing import Any

import redis

from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.records import RequestRecord
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings


class NoStreamDispatch:
    """Batch tests accept only low requests; a stream dispatch would be a bug."""

    def dispatch(self, request_id: str) -> None:
        raise AssertionError(f"unexpected stream dispatch of {request_id}")


def submit_low(client: redis.Redis, settings: Settings, content: str, model: str = "gpt-4o-mini",
               **fields: Any) -> str:
    """Accept one low request exactly as the intake does (record, queue, events)."""
    req = SubmitRequest.model_validate({
        "model": model, "priority": "low",
        "messages": [{"role": "user", "content": content}], **fields,
    })
    store = RequestStore(client, settings)
    return accept_sync(prepare(req, "default", settings), store, NoStreamDispatch()).record.id


def record(client: redis.Redis, settings: Settings, request_id: str) -> RequestRecord:
    found = RequestStore(client, settings).get(request_id)
    assert found is not None, request_id
    return found


def event_types(client: redis.Redis, settings: Settings, request_id: str) -> list[str]:
    return [e["type"] for e in RequestStore(client, settings).events_after(request_id)]


def create_low_bulk(client: redis.Redis, settings: Settings, contents: list[str],
                    model: str = "gpt-4o-mini", chunk: int = 2000) -> list[str]:
    """Many low requests at once: the intake's CREATE script, pipelined (for volume tests)."""
    import uuid

    from hybrid_router.router.core import events as ev
    from hybrid_router.router.core.records import now
    from hybrid_router.router.core.store import StoreOps

    ops = StoreOps(settings)
    ids: list[str] = []
    for start in range(0, len(contents), chunk):
        pipe = client.pipeline(transaction=False)
        for content in contents[start:start + chunk]:
            rec = RequestRecord(
                id=uuid.uuid4().hex, tenant="default", priority="low", route="batch",
                status="queued", model=model, created_at=now(),
                body={"model": model, "messages": [{"role": "user", "content": content}]},
            )
            op = ops.create(rec, [ev.accepted("batch", "low"), ev.queued()])
            if not ids:
                client.script_load(op.script.source)
            pipe.evalsha(op.script.sha, len(op.keys), *op.keys, *op.args)
            ids.append(rec.id)
        pipe.execute()
    return ids
