"""Signed, read-only stream URLs: a browser's way into one request's events.

A browser's ``EventSource`` cannot send an ``Authorization`` header, so the API gives out, with
each request (`SubmitResponse.stream_url`, `RequestView.stream_url`), the URL of its events with
a token in the query: ``/v1/requests/<id>/events?token=<token>``. The token is

    <tenant, base64url> "." <expiry, Unix seconds> "." <HMAC-SHA256, base64url>

where the HMAC is taken with the first of ``Settings.stream_url_secrets`` over the request id,
the tenant and the expiry. It opens that request's events (SSE, resumable with
``Last-Event-ID``) until the expiry and nothing else: the record, cancel and other requests
take a bearer key only. Checking one is pure CPU (one HMAC per secret, no Redis), so the SSE
hot path keeps its single Redis read (the owner check every follow does).

Rotation: put a new secret first; URLs signed with the old one keep working while it stays in
the list (drop it after ``Settings.stream_url_ttl_s``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass

from hybrid_router.router.core.errors import ErrorCode, Unauthenticated
from hybrid_router.settings import Settings

TOKEN_PARAM = "token"


class StreamTokenError(Unauthenticated):
    """A token that does not open the request's events; the message says why (a 401)."""

    default_code = ErrorCode.INVALID_STREAM_TOKEN


@dataclass(frozen=True)
class StreamGrant:
    """What a valid token grants: `request_id`'s events, as `tenant`, until `expires_at`."""

    request_id: str
    tenant: str
    expires_at: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, request_id: str, tenant: str, expires_at: int) -> bytes:
    message = f"hr-stream-v1\n{request_id}\n{tenant}\n{expires_at}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()


def sign(settings: Settings, request_id: str, tenant: str, now: float | None = None) -> str | None:
    """A token for `request_id` of `tenant`, valid `Settings.stream_url_ttl_s`; None when no
    secret is configured (stream URLs off)."""
    if not settings.stream_url_secrets:
        return None
    expires_at = int((time.time() if now is None else now) + settings.stream_url_ttl_s)
    secret = settings.stream_url_secrets[0].get_secret_value()
    mac = _mac(secret, request_id, tenant, expires_at)
    return f"{_b64(tenant.encode())}.{expires_at}.{_b64(mac)}"


def stream_url(settings: Settings, base: str, request_id: str, tenant: str) -> str | None:
    """The signed events URL of a request (`base` = the API's base URL), or None when off."""
    token = sign(settings, request_id, tenant)
    if token is None:
        return None
    return f"{base}/v1/requests/{request_id}/events?{TOKEN_PARAM}={token}"


def verify(settings: Settings, request_id: str, token: str, now: float | None = None
           ) -> StreamGrant:
    """The grant of `token` for `request_id`, or `StreamTokenError` saying what is wrong.

    The signature is checked before the expiry, so an altered expiry reads as altered."""
    if not settings.stream_url_secrets:
        raise StreamTokenError("stream URLs are turned off on this router "
                               "(ROUTER_STREAM_URL_SECRETS is empty)", code=ErrorCode.STREAM_URLS_OFF)
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 1024:
        raise StreamTokenError("malformed stream token: expected <tenant>.<expiry>.<signature>")
    tenant_b64, expiry_text, mac_b64 = parts
    try:
        tenant = _unb64(tenant_b64).decode()
        expires_at = int(expiry_text)
        mac = _unb64(mac_b64)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise StreamTokenError("malformed stream token: expected <tenant>.<expiry>.<signature>") from None
    valid = False
    for secret in settings.stream_url_secrets:  # every one: no early exit to time
        expected = _mac(secret.get_secret_value(), request_id, tenant, expires_at)
        valid = hmac.compare_digest(expected, mac) or valid
    if not valid:
        raise StreamTokenError("invalid stream token: it was altered, or it was issued for "
                               "another request (a stream URL opens only its own request's "
                               "events)")
    if (time.time() if now is None else now) >= expires_at:
        raise StreamTokenError(f"stream token expired at {expires_at} (Unix time): ask the "
                               "web app's backend for a fresh stream URL "
                               "(GET /v1/requests/{id} gives one)",
                               code=ErrorCode.STREAM_TOKEN_EXPIRED)
    return StreamGrant(request_id, tenant, expires_at)
