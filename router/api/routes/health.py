"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from hybrid_router.router.api.deps import RedisDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (no dependency checked)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(redis: RedisDep) -> JSONResponse:
    """Ready to accept requests: Redis answers."""
    try:
        await redis.ping()
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "redis": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready", "redis": "ok"})
