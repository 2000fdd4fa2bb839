"""``/v1/admin``: runtime configuration and an on-demand flush.

When auth is on only tenants in `Settings.admin_tenants` may call these (others get 403: the
routes are not secret, unlike request ids). With auth off (development) anyone may.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from hybrid_router.router.api.deps import Caller, CallerDep, RedisDep, SettingsDep
from hybrid_router.router.core.celery_app import FLUSH_TASK, build_celery
from hybrid_router.router.core.errors import ErrorCode, Forbidden, Unavailable
from hybrid_router.router.core.keys import Keys
from hybrid_router.router.core.logs import get_logger
from hybrid_router.router.core.runtime_config import (
    MAX_FLUSH_INTERVAL_S,
    read_flush_interval_async,
    runtime_view,
    set_flush_interval_async,
)
from hybrid_router.router.core.schemas import ErrorResponse
from hybrid_router.settings import Settings
from hybrid_router.settings.config import MIN_FLUSH_INTERVAL_S

log = get_logger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 503)
}


def require_admin(request: Request, caller: CallerDep) -> Caller:
    settings: Settings = request.app.state.settings
    if settings.auth_enabled and caller.tenant not in settings.admin_tenants:
        raise Forbidden("admin routes are for admin tenants only (ROUTER_ADMIN_TENANTS)",
                          code=ErrorCode.NOT_ADMIN)
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


class RuntimeConfigView(BaseModel):
    """The running service's values as beat reports them (`hybrid_router.router.core.runtime_config`)."""

    flush_interval_s: float
    flush_interval_overridden: bool
    flush_interval: dict[str, Any] = Field(
        description="seconds, source (run-time override or ROUTER_FLUSH_INTERVAL_S), set_at, "
                    "set_by, setting_s, setting_of")
    poll_interval_s: float
    expected_batch_turnaround_s: float
    reported_by: str
    beat: dict[str, Any] | None = Field(description="beat's report: host, pid, last tick, settings")


class RuntimeConfigUpdate(BaseModel):
    flush_interval_s: float = Field(
        ge=MIN_FLUSH_INTERVAL_S, le=MAX_FLUSH_INTERVAL_S, strict=True, allow_inf_nan=False,
        description=f"Seconds between batch flushes ({MIN_FLUSH_INTERVAL_S:g} to "
        f"{MAX_FLUSH_INTERVAL_S:g}).")


class FlushQueued(BaseModel):
    queued: bool
    task: str


@router.get("/config", response_model=RuntimeConfigView, responses=_ERRORS)
async def get_config(_: AdminDep, settings: SettingsDep, client: RedisDep) -> RuntimeConfigView:
    """The runtime configuration (flush interval as beat currently applies it)."""
    return RuntimeConfigView(**runtime_view(*await read_flush_interval_async(client, settings),
                                            settings))


@router.put("/config", response_model=RuntimeConfigView, responses=_ERRORS)
async def put_config(body: RuntimeConfigUpdate, caller: AdminDep, settings: SettingsDep,
                     client: RedisDep) -> RuntimeConfigView:
    """Change the flush interval; beat applies it at its next tick, no restart needed."""
    interval = await set_flush_interval_async(client, settings, body.flush_interval_s,
                                              by=f"api tenant {caller.tenant}")
    log.info("flush interval changed", flush_interval_s=interval, tenant=caller.tenant)
    return RuntimeConfigView(**runtime_view(*await read_flush_interval_async(client, settings),
                                            settings))


@router.post("/flush", status_code=202, response_model=FlushQueued, responses=_ERRORS)
async def flush_now(request: Request, caller: AdminDep, settings: SettingsDep) -> FlushQueued:
    """Send a flush to the batch worker now (it skips if a flush is already running)."""
    celery_app = getattr(request.app.state.dispatcher, "app", None)
    if celery_app is None:
        celery_app = build_celery(settings)
    queue = Keys(settings.key_prefix).batch_queue()
    try:
        await run_in_threadpool(celery_app.send_task, FLUSH_TASK, queue=queue,
                                routing_key=queue, retry=True)
    except Exception as exc:
        log.error("flush could not be queued", error=str(exc))
        raise Unavailable("the batch queue is unavailable; retry",
                          code=ErrorCode.QUEUE_UNAVAILABLE) from exc
    log.info("flush requested", tenant=caller.tenant)
    return FlushQueued(queued=True, task=FLUSH_TASK)
