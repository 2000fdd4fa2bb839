"""The forms of ROUTER_REDIS_URL (settings/redis_url.py, router/core/redis_io.py): parsing,
what Celery is given, what logs show, and the settings' one-line errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hybrid_router.router.core.broker_transport import SENTINEL_TRANSPORT, TRANSPORT, transport_for
from hybrid_router.router.core.redis_io import redis_target, safe_url
from hybrid_router.settings import Settings
from hybrid_router.settings.redis_url import parse_sentinel


def test_sentinel_url_parts() -> None:
    target = parse_sentinel("sentinel://app:s%40cret@s1:26379,s2,[::1]:26380/mymaster/3"
                            "?sentinel_password=spw")
    assert target.sentinels == (("s1", 26379), ("s2", 26379), ("::1", 26380))
    assert (target.service, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("app", "s@cret")
    assert target.sentinel_auth == {"password": "spw"}
    assert not target.ssl
    assert target.master_kwargs() == {"db": 3, "username": "app", "password": "s@cret"}


def test_tls_sentinel_url() -> None:
    target = parse_sentinel("sentinels://s1:26379/main?ssl_cert_reqs=none"
                            "&ssl_ca_certs=/etc/ca.pem")
    assert target.ssl and target.db == 0
    assert target.master_kwargs()["ssl"] is True
    assert target.sentinel_kwargs()["ssl_ca_certs"] == "/etc/ca.pem"
    tls = redis_target("sentinels://s1:26379/main?ssl_cert_reqs=none")
    assert tls.tls is not None and tls.tls.cert_reqs == "none"  # the raw paths speak TLS too
    assert redis_target("sentinel://s1:26379/main").tls is None


@pytest.mark.parametrize(("url", "fragment"), [
    ("sentinel:///mymaster/0", "at least one sentinel"),
    ("sentinel://s1:26379", "names the master"),
    ("sentinel://s1:x/mymaster", "bad sentinel port"),
    ("sentinel://s1/mymaster/zero", "bad db number"),
    ("sentinel://s1/mymaster?timeout=3", "unknown option(s) in the Sentinel URL: timeout"),
    ("memcached://h:1", "sentinel://h1:26379,h2:26379/mymaster/0"),
])
def test_bad_urls_name_what_to_fix(url: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(redis_url=url)
    assert fragment in str(error.value)


def test_celery_gets_kombus_sentinel_transport() -> None:
    url = "sentinel://:pw@s1:26379,s2:26380/mymaster/2"
    broker, options, ssl = redis_target(url).broker()
    assert broker == "sentinel://:pw@s1:26379/2;sentinel://:pw@s2:26380/2"
    assert options["master_name"] == "mymaster"
    assert ssl is None
    assert transport_for(url) == SENTINEL_TRANSPORT
    assert transport_for("rediss://h:6380/0") == TRANSPORT
    assert redis_target("redis://h:6379/0").broker() == ("redis://h:6379/0", {}, None)
    assert redis_target("sentinels://s1/m").broker()[2] == {"ssl_cert_reqs": "required"}


def test_sentinel_target_and_safe_url() -> None:
    target = redis_target("sentinel://u:pw@s1:26379/mymaster/4")
    assert (target.db, target.username, target.password) == (4, "u", "pw")
    assert target.sentinel is not None and target.sentinel.service == "mymaster"
    assert ("ROLE",) in target.setup_commands()  # a raw connection checks it reached the master
    assert redis_target("redis://:pw@h:6379/1").db == 1
    assert ("ROLE",) not in redis_target("redis://:pw@h:6379/1").setup_commands()
    assert safe_url("sentinel://u:pw@s1,s2/m/0?sentinel_password=x") == \
        "sentinel://u:***@s1,s2/m/0?sentinel_password=***"
    assert safe_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert safe_url("redis://h:6379/0") == "redis://h:6379/0"


def test_only_online_replicas_count() -> None:
    from hybrid_router.router.core.replica_wait import connected_replicas

    info = {"role": "master", "connected_slaves": 2,
            "slave0": {"ip": "10.0.0.2", "port": 6379, "state": "online", "offset": 10},
            "slave1": {"ip": "10.0.0.3", "port": 6379, "state": "wait_bgsave", "offset": 0}}
    assert connected_replicas(info) == 1
    assert connected_replicas({"role": "master", "connected_slaves": 0}) == 0
