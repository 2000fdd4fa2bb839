"""The stream publisher against real Redis: many streams publishing at once, each stream's
tokens arrive whole and in order, and a first token is never held back for the 2 ms window."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis
import redis.asyncio as aioredis

from router.intake import accept_sync, prepare
from router.redis_pipe import RedisPipe
from router.schemas import SubmitRequest
from router.store import AsyncRequestStore, RequestStore
from settings import Settings
from workers.stream_publisher import StreamPublisher


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


async def _publish_all(settings: Settings, streams: dict[str, list[str]]) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    store = AsyncRequestStore(client, settings)
    publisher = StreamPublisher(client, store.ops, RedisPipe(settings.redis_url))
    runner = asyncio.create_task(publisher.run())

    async def one(request_id: str, pieces: list[str]) -> None:
        handle = publisher.open(request_id)
        for n, piece in enumerate(pieces):
            publisher.publish(handle, piece)
            if n % 3 == 2:
                await asyncio.sleep(0.001)  # later tokens: some joined, some on their own
        await publisher.flush(handle)
        publisher.close(handle)

    try:
        await asyncio.gather(*(one(rid, pieces) for rid, pieces in streams.items()))
    finally:
        publisher.shutdown()
        runner.cancel()
        if publisher.pipe is not None:
            publisher.pipe.close()
        store.close()
        await client.aclose()


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
