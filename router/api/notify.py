"""Terminal notifications from the API's own terminal paths (cancellations).

The workers notify for the results they write; a cancel happens in the API, so the API sends
the callback task itself when the cancelled request has a `callback_url`.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from hybrid_router.router.core.celery_app import send_callback
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import RequestRecord

log = get_logger(__name__)


async def cancel_and_notify(app_state: Any, record: RequestRecord) -> tuple[str, str]:
    """Cancel `record` through the store; if it moved and has a callback_url, schedule the POST."""
    outcome, previous = await app_state.store.cancel(record.id, record.batch_queue)
    if outcome == "cancelled" and record.callback_url:
        celery_app = getattr(app_state.dispatcher, "app", None)
        if celery_app is not None:
            try:
                await run_in_threadpool(send_callback, celery_app, record.id)
            except Exception as exc:  # the cancel stands; the callback is best effort here
                log.error("cancel callback not scheduled", request_id=record.id, error=str(exc))
    return outcome, previous
