"""Cancelling a stream request from the worker side (a Celery revoke), the way the API does.

Same path as ``DELETE /v1/requests/{id}``: `hybrid_router.router.core.store.RequestStore.cancel` marks the record
``cancelled`` and emits the one ``cancelled`` event in one script (a request that is already
terminal is left alone), and the terminal callback is scheduled when the request has one.
"""

from __future__ import annotations

from hybrid_router.router.core.logs import get_logger
from hybrid_router.workers.stream.context import StreamContext

log = get_logger(__name__)


def cancel_stream(ctx: StreamContext, request_id: str, why: str) -> bool:
    """Cancel `request_id` (any state but terminal); True if this call cancelled it."""
    record = ctx.store.get(request_id)
    if record is None:
        return False
    outcome, previous = ctx.store.cancel(request_id, record.batch_queue)
    if outcome != "cancelled":
        return False
    log.info("request cancelled", request_id=request_id, previous_status=previous, why=why)
    if record.callback_url:
        try:
            ctx.notify(request_id)
        except Exception:  # the cancel stands; the callback is best effort here
            log.exception("scheduling the terminal callback failed", request_id=request_id)
    return True
