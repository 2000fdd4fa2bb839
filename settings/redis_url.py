"""The form of ``ROUTER_REDIS_URL``, parsed without touching the network (the settings check
it at start-up; `hybrid_router.router.core.redis_io` turns it into connections). See `core.redis_sentinel` for the
forms: ``redis://``, ``rediss://``, ``unix://``, ``sentinel://`` and ``sentinels://``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

SENTINEL_SCHEMES = ("sentinel", "sentinels")
SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
               "ssl_check_hostname")
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """A ``sentinel(s)://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_options: dict[str, Any] = field(default_factory=dict)
    sentinel_auth: dict[str, str] = field(default_factory=dict)

    def master_kwargs(self) -> dict[str, Any]:
        """Connection arguments of the master (for redis-py's ``master_for``)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.ssl:
            kwargs["ssl"] = True
            kwargs.update(self.ssl_options)
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection arguments of the sentinels themselves."""
        kwargs: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S,
                                  "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                                  **self.sentinel_auth}
        if self.ssl:
            kwargs["ssl"] = True
            kwargs.update(self.ssl_options)
        return kwargs


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def _ssl_value(name: str, value: str) -> Any:
    if name == "ssl_check_hostname":
        return value.lower() in ("1", "true", "yes")
    return value


def parse_sentinel(url: str) -> SentinelTarget:
    """Parse a ``sentinel://`` or ``sentinels://`` URL; `ValueError` naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {parts.scheme}://")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = item.partition(":")
        try:
            port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"bad sentinel port in {item!r}") from None
        sentinels.append((host, port))
    if not sentinels:
        raise ValueError("a Sentinel URL names at least one sentinel: "
                         "sentinel://host:26379,host2:26379/mymaster/0")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a Sentinel URL names the master after the sentinels: "
                         "sentinel://host:26379/mymaster/0")
    try:
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise ValueError(f"bad db number {path[1]!r} in the Sentinel URL") from None
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - set(SSL_OPTIONS) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError("unknown option(s) in the Sentinel URL: " + ", ".join(sorted(unknown)))
    auth = {name.removeprefix("sentinel_"): value for name, value in query.items()
            if name in ("sentinel_password", "sentinel_username")}
    return SentinelTarget(
        sentinels=tuple(sentinels), service=unquote(path[0]), db=db, username=username,
        password=password, ssl=parts.scheme == "sentinels",
        ssl_options={k: _ssl_value(k, v) for k, v in query.items() if k in SSL_OPTIONS},
        sentinel_auth=auth)


def check_url(url: str) -> str:
    """`url` when the router can use it, else `ValueError` (for the settings' validation)."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel(url)
    elif scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unsupported scheme {scheme}://; use redis://, rediss://, unix://, "
                         "sentinel:// or sentinels://")
    return url
