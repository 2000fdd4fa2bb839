"""What every stream of a process shares on the stream engine's loop.

Built by `hybrid_router.workers.stream.engine.StreamEngine` inside its loop (async Redis clients and the
httpx pool belong to the loop that made them); `ctx` is the process's synchronous
`StreamContext` (settings, lease keeper, retry policy, terminal-callback hook, and the sync
store used by the rare paths that run in a thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.redis_io import RedisPipe, async_client
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.settings import Settings
from hybrid_router.workers.stream.context import StreamContext
from hybrid_router.workers.stream.publisher import StreamPublisher
from hybrid_router.workers.upstream.sse import UpstreamStreamer


@dataclass
class StreamRuntime:
    ctx: StreamContext
    redis: aioredis.Redis
    store: AsyncRequestStore
    publisher: StreamPublisher
    upstream: UpstreamStreamer

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def keys(self) -> Keys:
        return self.ctx.keys

    @classmethod
    def build(cls, ctx: StreamContext, max_streams: int) -> StreamRuntime:
        """Call inside the engine's loop."""
        settings = ctx.settings
        # Blocking pool: a burst of stream starts waits for a connection instead of failing.
        client = async_client(settings.redis_url, blocking=True, max_connections=64, timeout=30,
                              health_check_interval=30)
        store = AsyncRequestStore(client, settings)
        return cls(ctx=ctx, redis=client, store=store,
                   publisher=StreamPublisher(store.ops, RedisPipe(settings.redis_url)),
                   upstream=UpstreamStreamer(settings, max_connections=max_streams))

    async def aclose(self) -> None:
        self.publisher.shutdown()
        self.publisher.pipe.close()
        await self.upstream.aclose()
        self.store.close()
        await self.redis.aclose()
