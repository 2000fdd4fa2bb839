"""Terminal callbacks: one signed POST of a request's final record to its `callback_url`.

Only hosts allowed by `hybrid_router.router.core.callback_policy` are called (no open relay). A host name that only a
wildcard allowed is resolved here, refused when it points at a private or local address, and
called at the address that was checked (`callback_target`). With a `callback_secret` the body
and the time of sending are signed (``X-Hybrid-Router-Signature: t=...,v1=...``,
`hybrid_router.router.core.callback_signature`); failures are retried with exponential backoff up to
`callback_max_attempts`, each attempt signed afresh.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
from celery import Celery

from hybrid_router.router.core.callback_policy import (
    address_refusal,
    callback_host,
    callback_port,
    callback_refusal,
    trusted_as_named,
)
from hybrid_router.router.core.callback_signature import SIGNATURE_HEADER, sign
from hybrid_router.router.core.celery_app import send_callback
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.records import RequestRecord, dumps
from hybrid_router.settings import Settings
from hybrid_router.workers.retry import RetryPolicy

log = get_logger(__name__)

CALLBACK_TIMEOUT_S = 10.0

Outcome = Literal["sent", "skipped", "retry", "gave_up", "refused"]


def callback_payload(record: RequestRecord) -> bytes:
    """The terminal record as the receiver sees it (no tenant, no prompt body)."""
    data: dict[str, Any] = record.model_dump(mode="json", exclude={"tenant", "body"})
    return dumps(data).encode()


@dataclass(frozen=True)
class CallbackResult:
    outcome: Outcome
    detail: str = ""


# The addresses a host name resolves to now (for a TCP connection to `port`).
Resolver = Callable[[str, int], list[str]]


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class CallbackTarget:
    """Where the POST goes: the URL as given, or pinned to the address that was checked (with
    the name kept in the Host header and, for TLS, in SNI and certificate checks)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


def callback_target(url: str, allowed_hosts: list[str], resolve: Resolver = resolve_host
                    ) -> CallbackTarget | CallbackResult:
    """The target for `url`, already allowed by `callback_refusal`; a refusal when its host is
    a name that only a wildcard allowed and that resolves to a private or local address; a retry
    when the name cannot be resolved now.

    Why pinned: resolving once to check and letting the HTTP client resolve again to connect
    would let a name answer a public address to the check and a private one to the call."""
    host = callback_host(url)
    if trusted_as_named(host, allowed_hosts):
        return CallbackTarget(url)
    parts = urlsplit(url)
    port = callback_port(url)
    try:
        addresses = resolve(host, port)
    except OSError as exc:
        return CallbackResult("retry", f"resolving {host}: {exc}"[:300])
    if not addresses:
        return CallbackResult("retry", f"{host} resolves to no address")
    refusal = address_refusal(host, addresses, allowed_hosts)
    if refusal:
        return CallbackResult("refused", refusal)
    address = addresses[0]
    userinfo, _, hostport = parts.netloc.rpartition("@")
    pinned = f"[{address}]" if ":" in address else address
    netloc = f"{userinfo}@{pinned}:{port}" if userinfo else f"{pinned}:{port}"
    # A pooled connection is never reused for another name at the same address: each name's
    # certificate is checked on a connection of its own.
    headers = {"Host": hostport, "Connection": "close"}
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    return CallbackTarget(urlunsplit(parts._replace(netloc=netloc)), headers, extensions)


def deliver_callback(settings: Settings, client: redis.Redis, http: httpx.Client,
                     request_id: str, resolve: Resolver = resolve_host) -> CallbackResult:
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
    target = (CallbackResult("refused", refusal) if refusal else
              callback_target(record.callback_url, settings.callback_allowed_hosts, resolve))
    if isinstance(target, CallbackResult):
        if target.outcome == "refused":
            log.warning("callback refused", request_id=request_id, reason=target.detail)
        return target
    body = callback_payload(record)
    headers = {"Content-Type": "application/json", "User-Agent": "hybrid-router",
               **target.headers}
    if settings.callback_secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, settings.callback_secret.get_secret_value())
    try:
        response = http.post(target.url, content=body, headers=headers,
                             timeout=CALLBACK_TIMEOUT_S, follow_redirects=False,
                             extensions=target.extensions)
    except httpx.HTTPError as exc:
        return CallbackResult("retry", f"{type(exc).__name__}: {exc}"[:300])
    if 200 <= response.status_code < 300:
        client.set(keys.callback_sent(request_id), "1", ex=settings.result_ttl_s)
        log.info("callback delivered", request_id=request_id, status=response.status_code)
        return CallbackResult("sent")
    return CallbackResult("retry", f"receiver answered {response.status_code}")


def callback_backoff(settings: Settings, attempt: int) -> float:
    return RetryPolicy.from_settings(settings).backoff(attempt)


def run_callback(app: Celery, settings: Settings, client: redis.Redis, http: httpx.Client,
                 request_id: str, attempt: int) -> CallbackResult:
    """Deliver, and schedule the next attempt with backoff when the receiver failed."""
    result = deliver_callback(settings, client, http, request_id)
    if result.outcome == "retry":
        if attempt < settings.callback_max_attempts:
            delay = callback_backoff(settings, attempt)
            log.warning("callback failed; retrying", request_id=request_id, attempt=attempt,
                        delay_s=round(delay, 2), detail=result.detail)
            send_callback(app, request_id, attempt + 1, countdown=delay)
        else:
            log.error("callback gave up", request_id=request_id, attempts=attempt,
                      detail=result.detail)
            return CallbackResult("gave_up", result.detail)
    return result


