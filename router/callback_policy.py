"""Which callback URLs may be called: only hosts in `Settings.callback_allowed_hosts`.

Shared by the intake (a bad `callback_url` is a 400, nothing queued) and the callback sender
(checked again at send time, in case the setting changed). The router is never an open relay:
an entry is a host name (``hooks.example.com``), a wildcard (``*.example.com``, or ``*`` for
any name) or an IP literal. IP literals in private, loopback, link-local or reserved ranges are
refused unless that exact address is listed; wildcards never match an IP literal in those
ranges.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def callback_refusal(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be called (None when it may)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return "callback_url must be an http:// or https:// URL"
    host = (parsed.hostname or "").lower().rstrip(".")
    if not host:
        return "callback_url must name a host"
    allowed = [h.lower().rstrip(".") for h in allowed_hosts]
    if not allowed:
        return "callbacks are disabled here (ROUTER_CALLBACK_ALLOWED_HOSTS is empty)"
    ip = _ip(host)
    if ip is not None:
        if host in allowed or str(ip) in allowed:
            return None
        if not ip.is_global:
            return f"callback_url host {host} is a private or local address and is not allowed"
        if "*" in allowed:
            return None
        return f"callback_url host {host} is not in ROUTER_CALLBACK_ALLOWED_HOSTS"
    for entry in allowed:
        if entry == "*" or entry == host:
            return None
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return None
    return f"callback_url host {host!r} is not in ROUTER_CALLBACK_ALLOWED_HOSTS"
