"""Which callback URLs may be called: only hosts in `Settings.callback_allowed_hosts`.

Shared by the intake (a bad `callback_url` is a 400, nothing queued) and the callback sender
(checked again at send time, in case the setting changed). The router is never an open relay:
an entry is a host name (``hooks.example.com``), a wildcard (``*.example.com``, or ``*`` for
any name) or an IP literal. IP literals in private, loopback, link-local or reserved ranges are
refused unless that exact address is listed; wildcards never match an IP literal in those
ranges. Nor do they match a *name* that resolves to one: a host name that only a wildcard lets
through is resolved by the sender, which refuses it when any of its addresses is private or
local (`address_refusal`) and then connects to the address it checked, so a name cannot be
re-pointed between the check and the call (`workers.callbacks`). A host name listed exactly is
the operator's own and is called whatever it resolves to.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlparse


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _normalized(hosts: list[str]) -> list[str]:
    return [h.lower().rstrip(".") for h in hosts]


def callback_host(url: str) -> str:
    """The host of `url` as the policy compares it (lower case, no trailing dot)."""
    return (urlparse(url).hostname or "").lower().rstrip(".")


def trusted_as_named(host: str, allowed_hosts: list[str]) -> bool:
    """Whether `host` can be called without looking at its addresses: an IP literal (judged
    by `callback_refusal` itself) or a name listed exactly, not only matched by a wildcard."""
    return _ip(host) is not None or host in _normalized(allowed_hosts)


def address_refusal(host: str, addresses: list[str], allowed_hosts: list[str]) -> str | None:
    """Why `host`, which a wildcard let through, may not be called at `addresses` (what it
    resolves to now): each must be a global address, or an address listed itself."""
    allowed = _normalized(allowed_hosts)
    for address in addresses:
        ip = _ip(address.split("%", 1)[0])
        if ip is None or (not ip.is_global and str(ip) not in allowed):
            return (f"callback_url host {host!r} resolves to {address}, a private or local "
                    "address; list the host itself in ROUTER_CALLBACK_ALLOWED_HOSTS to allow it")
    return None


def callback_refusal(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be called (None when it may)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return "callback_url must be an http:// or https:// URL"
    host = callback_host(url)
    if not host:
        return "callback_url must name a host"
    allowed = _normalized(allowed_hosts)
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
