"""Which callback URLs may be called: only hosts *and ports* in `Settings.callback_allowed_hosts`.

Shared by the intake (a bad `callback_url` is a 400, nothing queued) and the callback sender
(checked again at send time, in case the setting changed). The router is never an open relay:
an entry is a host name (``hooks.example.com``), a wildcard (``*.example.com``, or ``*`` for
any name) or an IP literal, with the ports it allows (`settings.parse_callback_host`): without
a port only 80 and 443, so a listed host's Redis, database or admin port is never called;
``host:8443`` allows that port, ``host:*`` any. IP literals in private, loopback, link-local or
reserved ranges are refused unless that exact address is listed; wildcards never match an IP
literal in those ranges. Nor do they match a *name* that resolves to one: a host name that only
a wildcard lets through is resolved by the sender, which refuses it when any of its addresses
is private or local (`address_refusal`) and then connects to the address it checked, so a name
cannot be re-pointed between the check and the call (`hybrid_router.workers.callbacks`). A host name listed
exactly is the operator's own and is called whatever it resolves to.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from hybrid_router.settings.config import CallbackHost, parse_callback_host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _entries(hosts: list[str]) -> list[CallbackHost]:
    return [parse_callback_host(h) for h in hosts]


def _normalized(hosts: list[str]) -> list[str]:
    return [entry.host for entry in _entries(hosts)]


def _split(url: str) -> SplitResult | str:
    """`url` split, or why it cannot be (Python's own parser raises on bad ports and IPv6)."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        return f"must be a valid URL ({exc})"
    return parts


def callback_url_problem(url: str) -> str | None:
    """What is wrong with `url` as a URL to call (None when it is a usable http(s) URL)."""
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        return "must be a URL without spaces or control characters"
    parts = _split(url)
    if isinstance(parts, str):
        return parts
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.port == 0:
        return "port must be 1-65535"
    return None


def callback_host(url: str) -> str:
    """The host of `url` as the policy compares it (lower case, no trailing dot)."""
    parts = _split(url)
    return "" if isinstance(parts, str) else (parts.hostname or "").lower().rstrip(".")


def callback_port(url: str) -> int:
    """The port `url` is called on: the explicit one, else 443 for https and 80 for http."""
    parts = urlsplit(url)
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


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


def _host_matches(entry: str, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
                  ) -> bool:
    if ip is not None:
        # An IP literal: listed exactly, or any public address under '*'.
        return entry in (host, str(ip)) or (entry == "*" and ip.is_global)
    return entry in ("*", host) or (entry.startswith("*.") and host.endswith(entry[1:]))


def callback_refusal(url: str, allowed_hosts: list[str]) -> str | None:
    """Why `url` may not be called (None when it may)."""
    problem = callback_url_problem(url)
    if problem is not None:
        return f"callback_url {problem}"
    host = callback_host(url)
    port = callback_port(url)
    entries = _entries(allowed_hosts)
    if not entries:
        return "callbacks are disabled here (ROUTER_CALLBACK_ALLOWED_HOSTS is empty)"
    ip = _ip(host)
    matching = [e for e in entries if _host_matches(e.host, host, ip)]
    if not matching:
        if ip is not None and not ip.is_global:
            return f"callback_url host {host} is a private or local address and is not allowed"
        return f"callback_url host {host!r} is not in ROUTER_CALLBACK_ALLOWED_HOSTS"
    if any(e.allows_port(port) for e in matching):
        return None
    shown = f"[{host}]" if ip is not None and ip.version == 6 else host
    return (f"callback_url port {port} is not allowed for host {host!r}: "
            "ROUTER_CALLBACK_ALLOWED_HOSTS allows it on ports 80 and 443 unless an entry names "
            f"the port (e.g. '{shown}:{port}')")
