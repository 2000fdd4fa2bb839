"""`GET /metrics` (Prometheus text) and `GET /v1/stats` (the same snapshot as JSON).

Both read Redis at request time (`router.stats`), so any API replica answers for the whole
deployment. `/metrics` carries counts only (no tenant data, no ids) and, like most exporters,
needs no API key so a scraper can reach it. `/v1/stats` adds every tenant's spend, so with auth
on it is for admin tenants only (`Settings.admin_tenants`), like `/v1/admin/*`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.api.deps import RedisDep, SettingsDep
from router.api.routes.admin import AdminDep
from router.metrics import RouterCollector
from router.stats import take_snapshot_async

router = APIRouter(tags=["monitoring"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(redis: RedisDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: queue depths, oldest age, batches in flight, latencies, tokens, cost."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RouterCollector(await take_snapshot_async(redis, settings)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/stats")
async def stats(redis: RedisDep, settings: SettingsDep, caller: AdminDep) -> dict[str, Any]:
    """Queues by lane and model, batches in flight, latency summaries and the cost ledger."""
    return (await take_snapshot_async(redis, settings)).as_dict()
