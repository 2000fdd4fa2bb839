"""Which batch mode to use: the upstream's Batch API (`native`) or ordinary completions
(`emulated`), or find out once (`auto`) and remember the answer in `Keys.batch_mode()`."""

from __future__ import annotations

from typing import Literal

import openai
import redis

from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.settings import Settings

log = get_logger(__name__)

ResolvedMode = Literal["native", "emulated"]
MODE_CACHE_TTL_S = 3600


def probe_batch_api(client: openai.OpenAI) -> ResolvedMode:
    """`GET /v1/batches?limit=1`: 404 (or 405/501) means the upstream has no Batch API."""
    try:
        client.batches.list(limit=1)
    except openai.NotFoundError:
        return "emulated"
    except openai.APIStatusError as exc:
        if exc.status_code in (405, 501):
            return "emulated"
        raise
    return "native"


def resolve_batch_mode(settings: Settings, client: redis.Redis,
                       upstream: openai.OpenAI) -> ResolvedMode:
    """The configured mode, or for `auto` the cached probe result (probing when not cached)."""
    if settings.batch_mode != "auto":
        return settings.batch_mode
    key = Keys(settings.key_prefix).batch_mode()
    cached = client.get(key)
    if cached in (b"native", b"emulated"):
        return "native" if cached == b"native" else "emulated"
    mode = probe_batch_api(upstream)
    client.set(key, mode, ex=MODE_CACHE_TTL_S)
    log.info("batch mode probed", mode=mode, upstream=settings.effective_upstream_base_url)
    return mode
