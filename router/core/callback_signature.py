"""Signing terminal callbacks so a receiver can tell they are ours, unchanged and fresh.

The header is ``X-Hybrid-Router-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``, the HMAC
taken with `Settings.callback_secret` over ``f"{t}.".encode() + body`` (as Stripe signs its
webhooks). Covering the timestamp as well as the body means a captured callback cannot be
replayed later: the receiver refuses a signature whose ``t`` is older than its tolerance
(five minutes is usual), and changing ``t`` breaks the HMAC. Receivers verify with the snippet
in docs/RELIABILITY.md ("Verifying a callback"), which `verify_signature` here mirrors and a
test runs as written.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Hybrid-Router-Signature"
DEFAULT_TOLERANCE_S = 300


def _digest(body: bytes, secret: str, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The signature header value for `body` sent at `timestamp` (now when None)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(body, secret, t)}"


def verify_signature(header: str, body: bytes, secret: str,
                     tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """Whether `header` signs `body` with `secret` within `tolerance_s` of `now`."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        fields.setdefault(key, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _digest(body, secret, t)
    return any(hmac.compare_digest(expected, v1) for v1 in fields.get("v1", []))
