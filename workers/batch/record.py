"""Recording a batch in Redis and marking its requests `submitted` in it.

Both the flush (right after it creates a batch) and the settling of a claim whose flush died
(`hybrid_router.workers.batch.adopt`, for a batch the upstream made that Redis never heard of) do this, in
this order: a batch is in flight before any of its requests says `submitted`, so a submitted
request always has a batch that the poll follows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.endpoints import CHAT
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.records import now
from hybrid_router.router.core.replay import replay_policy
from hybrid_router.settings import Settings
from hybrid_router.workers.batch.lua import SUBMIT_MANY_SCRIPT, ScriptCall, run_overlapped

SUBMIT_CHUNK = 500


def record_batch(client: redis.Redis, settings: Settings, batch_id: str, model: str, mode: str,
                 count: int, *, input_file_id: str = "", flush_id: str = "",
                 endpoint: str = CHAT) -> None:
    """Remember an upstream batch and put it in flight (before its requests are submitted)."""
    keys = Keys(settings.key_prefix)
    at = now()
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.batch(batch_id), mapping={
        "id": batch_id, "model": model, "mode": mode, "status": "submitted",
        "requests": count, "input_file_id": input_file_id, "flush_id": flush_id,
        "created_at": repr(at), "heartbeat_at": repr(at),
    })
    if endpoint != CHAT:
        pipe.hset(keys.batch(batch_id), "endpoint", endpoint)
    pipe.zadd(keys.batches_in_flight(), {batch_id: at})
    pipe.execute()


def mark_submitted(client: redis.Redis, settings: Settings, batch_id: str,
                   ids: list[str], chunk: int = SUBMIT_CHUNK) -> int:
    """Every still-`queued` id becomes `submitted` in `batch_id` (emitting `submitted`).

    Chunks are built while Redis runs the one before (`run_overlapped`).
    """
    keys = Keys(settings.key_prefix)
    event = ev.submitted(batch_id)
    at = repr(now())

    def calls() -> Iterator[tuple[int, ScriptCall]]:
        for start in range(0, len(ids), chunk):
            call_keys = [keys.batch_requests(batch_id), keys.batch_deadlines()]
            call_args: list[Any] = [batch_id, at, settings.replay_maxlen, replay_policy(settings),
                                    event]
            for request_id in ids[start:start + chunk]:
                call_keys += [keys.record(request_id), keys.seq(request_id),
                              keys.events(request_id)]
                call_args += [request_id, keys.channel(request_id)]
            yield start, (call_keys, call_args)

    return sum(int(moved) for _start, moved in run_overlapped(client, SUBMIT_MANY_SCRIPT, calls()))
