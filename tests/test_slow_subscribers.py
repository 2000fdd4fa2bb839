"""Slow and dead subscribers: a reader that never reads stalls nobody and grows nothing forever.

Three stuck readers sit on a live stream: an SSE client that never calls recv (raw socket with
a tiny receive buffer), a raw Redis SUBSCRIBE on the request's channel and a PSUBSCRIBE on every
request channel, neither of which ever reads. Meanwhile the stream worker streams, and a normal
SSE reader follows another request. Proven: the worker finishes on time, the normal reader gets
everything on time, the replay log stays capped at ``replay_maxlen``, and with the production
``client-output-buffer-limit pubsub`` set, Redis itself disconnects a pub/sub subscriber that
falls too far behind (docs/RELIABILITY.md) — the producer never waits for anyone.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.settings import Settings
from tests.support import Stack, start_redis_server, wait_until

PUBSUB_LIMIT = "pubsub 1mb 256kb 5"  # hard 1 MB, or 256 kB for 5 s (tests; see RELIABILITY.md)
REPLAY_MAXLEN = 100


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of our own: the test changes its pub/sub output limits."""
    proc, url = start_redis_server(tmp_path)
    client = redis.Redis.from_url(url)
    client.config_set("client-output-buffer-limit", PUBSUB_LIMIT)
    client.close()
    try:
        yield url
    finally:
        proc.stop()


def resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def stuck_socket(host: str, port: int) -> socket.socket:
    """A connected socket with a tiny receive buffer, to be written to and never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    return sock


def stuck_redis_subscriber(redis_url: str, name: str, command: str, target: str
                           ) -> socket.socket:
    parsed = urlparse(redis_url)
    sock = stuck_socket(parsed.hostname or "127.0.0.1", parsed.port or 6379)
    sock.sendall(resp("CLIENT", "SETNAME", name) + resp(command, target))
    return sock


def client_names(client: redis.Redis) -> set[str]:
    return {c.get("name", "") for c in client.client_list()}


def test_stuck_subscribers_stall_nothing_and_grow_nothing(
    private_redis: str, sim_url: str, make_settings: Callable[..., Settings],
    stack_factory: Callable[[Settings], Stack],
) -> None:
    settings = make_settings(redis_url=f"{private_redis}/0", upstream_base_url=sim_url,
                             replay_maxlen=REPLAY_MAXLEN, sse_keepalive_s=0.5)
    keys = Keys(settings.key_prefix)
    stack = stack_factory(settings)
    api = stack.start_api()
    stack.start_worker("stream", concurrency=8)
    client = redis.Redis.from_url(settings.redis_url)
    stuck: list[socket.socket] = []
    try:
        # 1. A long stream with many token events (~4 s at 150 tokens/s).
        big = httpx.post(f"{api}/v1/requests", timeout=10, json={
            "priority": "high",
            "messages": [{"role": "user", "content": f"big {uuid.uuid4().hex} "
                          "[[sim:tokens=600,tps=150]]"}]}).json()["id"]

        # 2. Three readers that never read.
        host, port = urlparse(api).hostname or "127.0.0.1", urlparse(api).port or 80
        sse = stuck_socket(host, port)
        sse.sendall(f"GET /v1/requests/{big}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stuck += [
            sse,
            stuck_redis_subscriber(settings.redis_url, "stuck-sub", "SUBSCRIBE",
                                   keys.channel(big)),
            stuck_redis_subscriber(settings.redis_url, "stuck-psub", "PSUBSCRIBE",
                                   keys.channel_pattern()),
        ]
        wait_until(lambda: {"stuck-sub", "stuck-psub"} <= client_names(client), 5,
                   message="stuck subscribers connected")

        # 3. A chatty neighbour on the same channel namespace: ~8 MB for the pattern subscriber,
        #    far past its output limit (kernel socket buffers absorb the first few MB).
        junk_channel = keys.channel(uuid.uuid4().hex)
        blob = "x" * 1024

        def chatter() -> None:
            with redis.Redis.from_url(settings.redis_url) as publisher:
                for _ in range(8):
                    pipe = publisher.pipeline(transaction=False)
                    for _ in range(1000):
                        pipe.publish(junk_channel, blob)
                    pipe.execute()

        chatty = threading.Thread(target=chatter, daemon=True)
        chatty.start()

        # 4. Meanwhile a normal request with a normal SSE reader finishes on time.
        started = time.monotonic()
        normal = httpx.post(f"{api}/v1/requests", timeout=10, json={
            "priority": "high",
            "messages": [{"role": "user", "content": f"normal {uuid.uuid4().hex} "
                          "[[sim:tokens=40,tps=40]]"}]}).json()["id"]
        text = []
        with httpx.stream("GET", f"{api}/v1/requests/{normal}/events", timeout=15) as events:
            for line in events.iter_lines():
                if line.startswith("event: "):
                    text.append(line[7:])
        elapsed = time.monotonic() - started
        assert text[-1] == "done", text
        assert elapsed < 8.0, f"a normal stream took {elapsed:.1f}s next to stuck readers"
        chatty.join(30)
        assert not chatty.is_alive(), "publishing blocked on a stuck subscriber"

        # 5. The worker was not stalled: the big stream completes in about its natural time.
        final = wait_until(
            lambda: (r := client.hget(keys.record(big), "status")) in
            (b"completed", b"failed", b"cancelled") and r, 20, message="big stream finished")
        assert final == b"completed"
        view = httpx.get(f"{api}/v1/requests/{big}", timeout=10).json()
        assert view["usage"]["completion_tokens"] == 600

        # 6. Nothing grows without bound: the replay log is capped ...
        node = int(str(client.config_get("stream-node-max-entries")["stream-node-max-entries"]))
        assert client.xlen(keys.events(big)) <= REPLAY_MAXLEN + node
        # ... and Redis (not the producer) dropped the subscriber that fell too far behind.
        wait_until(lambda: "stuck-psub" not in client_names(client), 15,
                   message="Redis disconnecting the stuck pattern subscriber")
        assert client.ping()
    finally:
        for sock in stuck:
            sock.close()
        client.close()


def test_a_dead_sse_client_does_not_hold_the_stream(
    sim_url: str, make_settings: Callable[..., Settings],
    stack_factory: Callable[[Settings], Stack],
) -> None:
    """A client that opens the SSE stream and vanishes (socket closed) changes nothing: the
    stream completes and another reader replays every event from the log."""
    settings = make_settings(upstream_base_url=sim_url, sse_keepalive_s=0.5)
    stack = stack_factory(settings)
    api = stack.start_api()
    stack.start_worker("stream", concurrency=4)
    rid = httpx.post(f"{api}/v1/requests", timeout=10, json={
        "priority": "high",
        "messages": [{"role": "user", "content": "vanishing reader [[sim:tokens=80,tps=80]]"}],
    }).json()["id"]
    host, port = urlparse(api).hostname or "127.0.0.1", urlparse(api).port or 80
    for _ in range(5):
        sock = stuck_socket(host, port)
        sock.sendall(f"GET /v1/requests/{rid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        sock.recv(64)
        sock.close()
    wait_until(lambda: httpx.get(f"{api}/v1/requests/{rid}").json()["status"] == "completed",
               20, message="stream completed")
    with httpx.stream("GET", f"{api}/v1/requests/{rid}/events", timeout=10) as events:
        seqs = [int(line[4:]) for line in events.iter_lines() if line.startswith("id: ")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the replay"
    assert seqs[0] == 1
