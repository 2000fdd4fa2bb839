"""Every Redis key comes from `Keys`: prefixed, per-request keys share a hash tag."""

from __future__ import annotations

import inspect
import re

from hybrid_router.router.core.keys import Keys


def all_keys(keys: Keys) -> dict[str, str]:
    out = {}
    for name, method in inspect.getmembers(keys, inspect.ismethod):
        if name.startswith("_"):
            continue
        params = [p for p in inspect.signature(method).parameters.values()]
        args = {"request_id": "abc123", "tenant": "acme", "idempotency_key": "k", "model": "m",
                "flush_id": "f", "batch_id": "b", "api_key_id": "kid", "kind": "rpm",
                "window": 7, "lane": "stream"}
        out[name] = method(**{p.name: args.get(p.name, "x") for p in params})
    return out


def test_every_key_starts_with_the_prefix() -> None:
    for name, key in all_keys(Keys("myapp")).items():
        assert key.startswith(("myapp:", "myapp.")), (name, key)


def test_prefixes_do_not_collide() -> None:
    a, b = all_keys(Keys("a")), all_keys(Keys("ab"))
    assert not set(a.values()) & set(b.values())
    # Distinct builders never produce the same key for the same arguments.
    assert len(set(a.values())) == len(a)


def test_request_keys_share_a_cluster_hash_tag() -> None:
    keys = Keys("hr")
    for key in (keys.record("r1"), keys.events("r1"), keys.seq("r1"), keys.lease("r1"),
                keys.cancel_flag("r1")):
        assert re.search(r"\{r1\}", key), key
    assert keys.channel("r1") == "hr:chan:r1"


def test_celery_names() -> None:
    keys = Keys("hr")
    assert keys.stream_queue() == "hr.stream" and keys.batch_queue() == "hr.batch"
    assert keys.celery_prefix() == "hr.celery."
