"""`enforce_rate_limit`: the FastAPI dependency that applies per-key rate limits.

Added to the routes that create work (``POST /v1/requests``, ``POST /v1/chat/completions``).
Over the limit the answer is OpenAI's: 429, ``type: rate_limit_error``, a ``retry-after``
header in seconds and ``x-ratelimit-limit-*`` headers, so OpenAI SDKs back off on their own.
It runs before the request is stored, so a refused request leaves nothing queued.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from hybrid_router.router.api.deps import CallerDep, SettingsDep, StoreDep
from hybrid_router.router.core.errors import ErrorCode, InvalidRequest, RateLimited
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.ratelimit import RateLimiter, estimate_request_tokens, limits_enabled

log = get_logger(__name__)


async def _body_json(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return None  # the route's own validation answers 400 for it


async def enforce_rate_limit(
    request: Request, caller: CallerDep, settings: SettingsDep, store: StoreDep
) -> None:
    """Count this request against its API key's limits, or refuse it with a 429."""
    if not limits_enabled(settings):
        return
    tokens = estimate_request_tokens(await _body_json(request))
    decision = await RateLimiter(settings).check_async(store.scripts, caller.key_id, tokens)
    if decision.allowed:
        return
    if decision.too_large:
        raise InvalidRequest(f"this request may use about {tokens} tokens, more than the limit of "
            f"{decision.limit} tokens per minute of this API key; lower max_tokens or shorten "
            "the messages",
            param="max_tokens",
            code=ErrorCode.REQUEST_TOO_LARGE,
        )
    log.info("rate limited", key_id=caller.key_id, kind=decision.kind, limit=decision.limit)
    raise RateLimited(
        f"rate limit reached: {decision.limit} {decision.kind} per minute for this API key; "
        f"retry after {decision.retry_after_s} s",
        code=ErrorCode(f"rate_limit_{decision.kind}"),
        headers={
            "retry-after": str(decision.retry_after_s),
            f"x-ratelimit-limit-{decision.kind}": str(decision.limit),
            f"x-ratelimit-remaining-{decision.kind}": "0",
        },
    )
