"""The stream publisher against real Redis: many streams publishing at once, each stream's
tokens arrive whole and in order, a first token is never held back for the 2 ms window, a
publish is fenced by the stream's lease and never appended twice, and a Redis restart is ridden
out with nothing lost or doubled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis

from hybrid_router.router.core import events as ev
from hybrid_router.router.core.intake import accept_sync, prepare
from hybrid_router.router.core.redis_io import RedisPipe
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.router.core.store import AsyncRequestStore, RequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.stream.publisher import StreamPublisher
from tests.support import start_redis_server

OWNER = "worker-under-test"


class Recorder:
    """A stream dispatcher that only remembers (the record is what the test needs)."""

    def dispatch(self, request_id: str) -> None:
        pass


def _stream_request(client: redis.Redis, settings: Settings, content: str) -> str:
    req = SubmitRequest.model_validate({
        "model": "gpt-4o-mini", "priority": "high",
        "messages": [{"role": "user", "content": content}]})
    return accept_sync(prepare(req, "default", settings), RequestStore(client, settings),
                       Recorder()).record.id


def _tokens(client: redis.Redis, settings: Settings, request_id: str) -> list[tuple[int, str]]:
    return [(int(e["seq"]), str(e["content"]))
            for e in RequestStore(client, settings).events_after(request_id)
            if e["type"] == "token"]


@contextlib.asynccontextmanager
async def _running_publisher(settings: Settings) -> AsyncIterator[StreamPublisher]:
    """A publisher and its task on the running loop, as a stream engine has them."""
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AsyncRequestStore(client, settings)
    publisher = StreamPublisher(store.ops, RedisPipe(settings.redis_url))
    runner = asyncio.create_task(publisher.run())
    try:
        yield publisher
    finally:
        publisher.shutdown()
        runner.cancel()
        if publisher.pipe is not None:
            publisher.pipe.close()
        store.close()
        await client.aclose()


async def _publish_all(settings: Settings, streams: dict[str, list[str]]) -> None:
    async with _running_publisher(settings) as publisher:

        async def one(request_id: str, pieces: list[str]) -> None:
            handle = publisher.open(request_id, OWNER)
            for n, piece in enumerate(pieces):
                publisher.publish(handle, piece)
                if n % 3 == 2:
                    await asyncio.sleep(0.001)  # later tokens: some joined, some on their own
            await publisher.flush(handle)
            publisher.close(handle)

        await asyncio.gather(*(one(rid, pieces) for rid, pieces in streams.items()))


def test_every_stream_s_tokens_arrive_whole_and_in_order(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    settings = make_settings()
    streams = {_stream_request(redis_client, settings, f"publisher {i}"):
               [f"<{i}:{n}>" for n in range(12)] for i in range(25)}
    asyncio.run(_publish_all(settings, streams))
    for request_id, pieces in streams.items():
        tokens = _tokens(redis_client, settings, request_id)
        seqs = [seq for seq, _ in tokens]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert "".join(content for _, content in tokens) == "".join(pieces)
        # The first token goes out on the publisher's next turn, with only what arrived in the
        # same turn (the three published before the stream's first pause), not after 2 ms.
        assert tokens[0][1] == "".join(pieces[:3])


def test_a_token_event_is_fenced_by_the_lease_and_never_appended_twice(
        make_settings: Callable[..., Settings], redis_client: redis.Redis) -> None:
    """EMIT_TOKENS: a repeat of an event that got in (its reply was lost) appends nothing; a
    sender whose count is stale, or who does not hold the lease, is refused (-2); a terminal
    request refuses everything (-1)."""
    settings = make_settings()
    store = RequestStore(redis_client, settings)
    request_id = _stream_request(redis_client, settings, "fenced")

    def emit(owner: str, before: int, text: str) -> int:
        return store.run(store.ops.emit_tokens(request_id, owner, before, len(text),
                                               [ev.token(text)]))

    assert emit(OWNER, 0, "ab") > 0
    assert emit(OWNER, 0, "ab") == 0  # the same event again: already in the log
    assert emit(OWNER, 1, "cde") == -2  # a count that is not the log's: another sender
    redis_client.set(store.keys.lease(request_id), "another-worker")
    assert emit(OWNER, 2, "cd") == -2  # the lease is somebody else's
    assert emit("another-worker", 2, "cd") > 0
    assert [c for _, c in _tokens(redis_client, settings, request_id)] == ["ab", "cd"]
    assert store.get(request_id).content_tokens_relayed == 4  # type: ignore[union-attr]
    store.cancel(request_id, "gpt-4o-mini")
    assert emit("another-worker", 4, "e") == -1


async def _publish_through_a_restart(settings: Settings, request_id: str, restart: Callable[[], None],
                                     pieces: list[str]) -> None:
    async with _running_publisher(settings) as publisher:
        handle = publisher.open(request_id, OWNER)
        half = len(pieces) // 2
        for piece in pieces[:half]:
            publisher.publish(handle, piece)
            await asyncio.sleep(0.003)
        await publisher.flush(handle)
        restarting = asyncio.get_running_loop().run_in_executor(None, restart)
        for piece in pieces[half:]:  # published while Redis is down and coming back
            publisher.publish(handle, piece)
            await asyncio.sleep(0.01)
        await restarting
        await publisher.flush(handle, timeout=30)
        assert handle.error is None and not handle.stopped
        assert handle.relayed == len(pieces)


def test_the_publisher_rides_out_a_redis_restart(make_settings: Callable[..., Settings],
                                                 tmp_path: Path) -> None:
    """Redis stopped (SIGTERM, append-only file kept) for ~2 s while a stream publishes: every
    token reaches the replay log once, in order, and the stream never sees an error."""
    proc, url = start_redis_server(tmp_path, appendonly=True)
    port = int(url.rsplit(":", 1)[1])
    holder = {"proc": proc}
    try:
        settings = make_settings(redis_url=f"{url}/0", stream_redis_grace_s=20)
        client = redis.Redis.from_url(settings.redis_url)
        request_id = _stream_request(client, settings, "through a restart")

        def restart() -> None:
            holder["proc"].stop()
            import time

            time.sleep(2)  # the outage itself: what the test is about, not a wait for a result
            holder["proc"], _ = start_redis_server(tmp_path, appendonly=True, port=port)

        pieces = [f"<{n}>" for n in range(60)]
        asyncio.run(_publish_through_a_restart(settings, request_id, restart, pieces))
        client = redis.Redis.from_url(settings.redis_url)
        tokens = _tokens(client, settings, request_id)
        assert "".join(c for _, c in tokens) == "".join(pieces)
        seqs = [seq for seq, _ in tokens]
        assert seqs == sorted(set(seqs))
        client.close()
    finally:
        holder["proc"].stop()
