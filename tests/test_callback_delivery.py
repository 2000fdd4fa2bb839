"""Callback delivery against a real HTTP receiver: a host name that only a wildcard allowed is
resolved, refused when it points at a private or local address, and called at the address that
was checked. Real Redis records, real HTTP; only name resolution is substituted where a test
needs a name that no DNS knows."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from hybrid_router.router.core.callback_policy import address_refusal
from hybrid_router.router.core.callback_signature import verify_signature
from hybrid_router.router.core.store import RequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.callbacks import CallbackTarget, callback_target, deliver_callback
from tests.batch_helpers import submit_low
from tests.callback_receiver import CallbackReceiver, callback_receiver


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    with callback_receiver() as r:
        yield r


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


def _terminal_request(client: redis.Redis, settings: Settings, callback_url: str) -> str:
    request_id = submit_low(client, settings, f"callback to {callback_url}",
                            callback_url=callback_url)
    RequestStore(client, settings).cancel(request_id, "gpt-4o-mini")  # terminal: cancelled
    return request_id


def test_address_refusal_allows_only_global_or_listed_addresses() -> None:
    assert address_refusal("a.example.com", ["93.184.216.34"], ["*"]) is None
    assert address_refusal("a.example.com", ["2606:2800:220:1::1"], ["*"]) is None
    for private in ("127.0.0.1", "10.0.0.5", "192.168.1.9", "169.254.169.254", "::1",
                    "fe80::1%eth0", "fd00::1"):
        refusal = address_refusal("a.example.com", ["93.184.216.34", private], ["*"])
        assert refusal is not None and private in refusal and "a.example.com" in refusal
    assert address_refusal("a.example.com", ["10.0.0.5"], ["*", "10.0.0.5"]) is None


def test_a_wildcard_name_that_resolves_to_loopback_is_refused_and_nothing_is_sent(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, receiver: CallbackReceiver,
        http: httpx.Client) -> None:
    settings = make_settings(callback_allowed_hosts=["*:*"])
    request_id = _terminal_request(redis_client, settings,
                                   f"http://localhost:{receiver.port}/hook")
    result = deliver_callback(settings, redis_client, http, request_id)  # the real resolver
    assert result.outcome == "refused"
    assert "localhost" in result.detail and "private or local" in result.detail
    assert receiver.posts == []


def test_a_listed_name_is_called_as_given(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, receiver: CallbackReceiver,
        http: httpx.Client) -> None:
    settings = make_settings(callback_allowed_hosts=["localhost:*"], callback_secret="s3cret")
    request_id = _terminal_request(redis_client, settings,
                                   f"http://localhost:{receiver.port}/hook/listed")
    assert deliver_callback(settings, redis_client, http, request_id).outcome == "sent"
    [post] = receiver.posts
    assert post.path == "/hook/listed" and post.host == f"localhost:{receiver.port}"
    assert post.signature is not None
    assert verify_signature(post.signature, post.body, "s3cret")


def test_a_wildcard_name_is_called_at_the_address_that_was_checked(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, receiver: CallbackReceiver,
        http: httpx.Client) -> None:
    """`hooks.pinned.test` exists in no DNS: the POST arrives only because it went to the
    address the check saw, with the name in the Host header."""
    settings = make_settings(callback_allowed_hosts=["*.pinned.test:*", "127.0.0.1"])
    url = f"http://hooks.pinned.test:{receiver.port}/hook/pinned?x=1"
    request_id = _terminal_request(redis_client, settings, url)
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    result = deliver_callback(settings, redis_client, http, request_id, resolve=resolve)
    assert result.outcome == "sent", result.detail
    assert asked == [("hooks.pinned.test", receiver.port)]
    [post] = receiver.posts
    assert post.path == "/hook/pinned?x=1"
    assert post.host == f"hooks.pinned.test:{receiver.port}"
    # Delivered once: a second delivery of the same request sends nothing.
    assert deliver_callback(settings, redis_client, http, request_id,
                            resolve=resolve).outcome == "skipped"
    assert len(receiver.posts) == 1


def test_a_wildcard_name_that_cannot_be_resolved_now_is_retried_later(
        make_settings: Callable[..., Settings], redis_client: redis.Redis,
        http: httpx.Client) -> None:
    settings = make_settings(callback_allowed_hosts=["*"])
    request_id = _terminal_request(redis_client, settings, "https://hooks.down.test/hook")

    def unresolvable(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    result = deliver_callback(settings, redis_client, http, request_id, resolve=unresolvable)
    assert result.outcome == "retry" and "hooks.down.test" in result.detail


def test_an_https_target_keeps_its_name_for_sni_and_never_shares_a_connection() -> None:
    target = callback_target("https://user:pw@a.hooks.test/h?q=1", ["*.hooks.test"],
                             lambda _host, _port: ["2606:2800:220:1::1", "93.184.216.34"])
    assert target == CallbackTarget(
        "https://user:pw@[2606:2800:220:1::1]:443/h?q=1",
        {"Host": "a.hooks.test", "Connection": "close"},
        {"sni_hostname": "a.hooks.test"},
    )


def test_a_port_no_longer_allowed_is_refused_at_send_time(
        make_settings: Callable[..., Settings], redis_client: redis.Redis, receiver: CallbackReceiver,
        http: httpx.Client) -> None:
    """Accepted while ``127.0.0.1:*`` was listed; sent after the list became ``127.0.0.1``
    (ports 80 and 443): refused, nothing sent (issue 16: ports are part of the allowlist)."""
    accepting = make_settings(callback_allowed_hosts=["127.0.0.1:*"])
    request_id = _terminal_request(redis_client, accepting, receiver.url("port"))
    sending = accepting.model_copy(update={"callback_allowed_hosts": ["127.0.0.1"]})
    result = deliver_callback(sending, redis_client, http, request_id)
    assert result.outcome == "refused" and str(receiver.port) in result.detail
    assert receiver.posts == []
    assert deliver_callback(accepting, redis_client, http, request_id).outcome == "sent"
