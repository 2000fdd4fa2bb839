"""FastAPI dependencies: settings, the store, the dispatcher and the caller's tenant.

Every dependency here is ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in the thread pool, and a thread hop per dependency per request was the largest
single cost of ``POST /v1/requests`` (bench_intake). They only read ``app.state`` and headers.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Header, Request

from hybrid_router.router.core.errors import ErrorCode, Unauthenticated
from hybrid_router.router.core.event_hub import EventFollower
from hybrid_router.router.core.intake import StreamDispatcher
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.settings import Settings

DEV_TENANT = "default"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant their key maps to, and a non-secret id of the key."""

    tenant: str
    key_id: str


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_redis(request: Request) -> aioredis.Redis:
    client: aioredis.Redis = request.app.state.redis
    return client


async def get_store(request: Request) -> AsyncRequestStore:
    store: AsyncRequestStore = request.app.state.store
    return store


async def get_events(request: Request) -> EventFollower:
    follower: EventFollower = request.app.state.events
    return follower


async def get_dispatcher(request: Request) -> StreamDispatcher:
    dispatcher: StreamDispatcher = request.app.state.dispatcher
    return dispatcher


@lru_cache(maxsize=256)  # only ever called with a key that matched one of settings.api_keys
def key_id(api_key: str) -> str:
    """A short, non-reversible id of an API key, safe to log and to use in rate-limit keys."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def get_caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """Map the bearer key to its tenant; 401 when auth is on and the key is missing or wrong."""
    settings: Settings = request.app.state.settings
    if not settings.auth_enabled:
        return Caller(DEV_TENANT, "dev")
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
            code=ErrorCode.MISSING_API_KEY,
        )
    for known, tenant in settings.api_keys.items():
        if hmac.compare_digest(known.encode(), token.encode()):
            return Caller(tenant, key_id(token))
    raise Unauthenticated("invalid API key", code=ErrorCode.INVALID_API_KEY)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StoreDep = Annotated[AsyncRequestStore, Depends(get_store)]
RedisDep = Annotated[aioredis.Redis, Depends(get_redis)]
DispatcherDep = Annotated[StreamDispatcher, Depends(get_dispatcher)]
CallerDep = Annotated[Caller, Depends(get_caller)]
EventsDep = Annotated[EventFollower, Depends(get_events)]
