"""The Python client: `RouterClient` / `AsyncRouterClient` over HTTP, `enqueue` without HTTP."""

from hybrid_router.router.client.client import (
    AsyncRequestHandle,
    AsyncRouterClient,
    DirectEnqueuer,
    RequestHandle,
    RouterClient,
    RouterError,
    SSEDecoder,
    enqueue,
)
from hybrid_router.router.core.subscribe import follow_events

__all__ = ["AsyncRequestHandle", "AsyncRouterClient", "DirectEnqueuer", "RequestHandle",
           "RouterClient", "RouterError", "SSEDecoder", "enqueue", "follow_events"]
