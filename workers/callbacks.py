"""Terminal callbacks: one signed POST of a request's final record to its `callback_url`.

Only hosts allowed by `router.callback_policy` are called (no open relay). The body is signed with
``X-Hybrid-Router-Signature: sha256=<hex HMAC-SHA256 of the body with callback_secret>``;
failures are retried with exponential backoff up to `callback_max_attempts`.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import redis
from celery import Celery

from router.callback_policy import callback_refusal
from router.keys import Keys
from router.logs import get_logger
from router.records import RequestRecord, dumps
from settings import Settings
from workers.retry import RetryPolicy

log = get_logger(__name__)

CALLBACK_TASK = "hr.batch.callback"
SIGNATURE_HEADER = "X-Hybrid-Router-Signature"
CALLBACK_TIMEOUT_S = 10.0

Outcome = Literal["sent", "skipped", "retry", "gave_up", "refused"]


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def callback_payload(record: RequestRecord) -> bytes:
    """The terminal record as the receiver sees it (no tenant, no prompt body)."""
    data: dict[str, Any] = record.model_dump(mode="json", exclude={"tenant", "body"})
    return dumps(data).encode()


@dataclass(frozen=True)
class CallbackResult:
    outcome: Outcome
    detail: str = ""


def deliver_callback(settings: Settings, client: redis.Redis, http: httpx.Client,
                     request_id: str) -> CallbackResult:
    """POST the terminal record once; 'retry' when the receiver failed and may succeed later."""
    keys = Keys(settings.key_prefix)
    raw = client.hgetall(keys.record(request_id))
    if not raw:
        return CallbackResult("skipped", "no such request")
    record = RequestRecord.from_hash(raw)
    if not record.terminal or not record.callback_url:
        return CallbackResult("skipped", "not terminal or no callback_url")
    if client.exists(keys.callback_sent(request_id)):
        return CallbackResult("skipped", "already delivered")
    refusal = callback_refusal(record.callback_url, settings.callback_allowed_hosts)
    if refusal:
        log.warning("callback refused", request_id=request_id, reason=refusal)
        return CallbackResult("refused", refusal)
    body = callback_payload(record)
    headers = {"Content-Type": "application/json", "User-Agent": "hybrid-router"}
    if settings.callback_secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, settings.callback_secret.get_secret_value())
    try:
        response = http.post(record.callback_url, content=body, headers=headers,
                             timeout=CALLBACK_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as exc:
        return CallbackResult("retry", f"{type(exc).__name__}: {exc}"[:300])
    if 200 <= response.status_code < 300:
        client.set(keys.callback_sent(request_id), "1", ex=settings.result_ttl_s)
        log.info("callback delivered", request_id=request_id, status=response.status_code)
        return CallbackResult("sent")
    return CallbackResult("retry", f"receiver answered {response.status_code}")


def callback_backoff(settings: Settings, attempt: int) -> float:
    return RetryPolicy.from_settings(settings).backoff(attempt)


def schedule_callback(app: Celery, request_id: str, attempt: int = 1,
                      countdown: float = 0.0) -> None:
    """Send the task that POSTs the terminal record of `request_id` to its callback_url."""
    from workers.celery_app import settings_of

    queue = Keys(settings_of(app).key_prefix).batch_queue()
    app.send_task(CALLBACK_TASK, args=[request_id, attempt], queue=queue, routing_key=queue,
                  countdown=countdown or None, retry=True)


def run_callback(app: Celery, settings: Settings, client: redis.Redis, http: httpx.Client,
                 request_id: str, attempt: int) -> CallbackResult:
    """Deliver, and schedule the next attempt with backoff when the receiver failed."""
    result = deliver_callback(settings, client, http, request_id)
    if result.outcome == "retry":
        if attempt < settings.callback_max_attempts:
            delay = callback_backoff(settings, attempt)
            log.warning("callback failed; retrying", request_id=request_id, attempt=attempt,
                        delay_s=round(delay, 2), detail=result.detail)
            schedule_callback(app, request_id, attempt + 1, countdown=delay)
        else:
            log.error("callback gave up", request_id=request_id, attempts=attempt,
                      detail=result.detail)
            return CallbackResult("gave_up", result.detail)
    return result


