"""`GET /metrics` (Prometheus text) and `GET /v1/stats` (the same snapshot as JSON).

Both read Redis at request time (`hybrid_router.router.core.stats`), so any API replica answers for the whole
deployment. `/metrics` carries counts only (no tenant data, no ids, and models only as the
operator named them, else `other`: `Settings.model_label`). Like most exporters it is open by
default so a scraper can reach it; with `ROUTER_METRICS_TOKEN` set it answers 401 unless sent
`Authorization: Bearer <token>` (Prometheus: `authorization: {credentials: ...}`). `/v1/stats`
adds every tenant's spend, so with auth on it is for admin tenants only
(`Settings.admin_tenants`), like `/v1/admin/*`.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from hybrid_router.router.api.deps import RedisDep, SettingsDep, bearer_token
from hybrid_router.router.api.routes.admin import AdminDep
from hybrid_router.router.core.errors import ErrorCode, Unauthenticated
from hybrid_router.router.core.live_stats import take_live_async
from hybrid_router.router.core.metrics import RouterCollector
from hybrid_router.router.core.stats import take_snapshot_async

router = APIRouter(tags=["monitoring"])


async def require_metrics_token(settings: SettingsDep,
                                authorization: Annotated[str | None, Header()] = None) -> None:
    """401 unless `ROUTER_METRICS_TOKEN` is unset or sent as the bearer token."""
    if settings.metrics_token is None:
        return
    expected = settings.metrics_token.get_secret_value().encode()
    token = bearer_token(authorization)
    if token is None or not hmac.compare_digest(expected, token.encode()):
        raise Unauthenticated("GET /metrics needs 'Authorization: Bearer <ROUTER_METRICS_TOKEN>'",
                          code=ErrorCode.INVALID_METRICS_TOKEN)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
            dependencies=[Depends(require_metrics_token)])
async def metrics(redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: queue depths, oldest age, batches in flight, latencies, tokens, cost."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(await take_snapshot_async(redis, settings)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats")
async def stats(redis: RedisDep, settings: SettingsDep, caller: AdminDep) -> dict[str, Any]:
    """Queues by lane and model, batches in flight, latency summaries and the cost ledger;
    ``live``: batches one by one, the flush, streams per worker, recent TTFT and today's cost
    (`hybrid_router.router.core.live_stats`, what ``GET /ui`` shows)."""
    data = (await take_snapshot_async(redis, settings)).as_dict()
    data["live"] = (await take_live_async(redis, settings)).as_dict()
    return data
