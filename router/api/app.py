"""The intake API application: `create_app(settings)` wires routes, dependencies and limits."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from hybrid_router.router.api.errors import install_error_handlers
from hybrid_router.router.api.fast_path import FastPaths
from hybrid_router.router.api.http_guards import BodyGuard
from hybrid_router.router.api.routes import admin, chat, events, health, metrics, requests, responses, ui
from hybrid_router.router.core.celery_app import build_celery
from hybrid_router.router.core.dispatch import CeleryStreamDispatcher
from hybrid_router.router.core.event_hub import event_follower
from hybrid_router.router.core.intake import StreamDispatcher
from hybrid_router.router.core.lane_facts import LaneFactsCache
from hybrid_router.router.core.logs import configure_logging, get_logger
from hybrid_router.router.core.redis_io import async_client, safe_url
from hybrid_router.router.core.store import AsyncRequestStore
from hybrid_router.settings import Settings

log = get_logger(__name__)


def create_app(settings: Settings, dispatcher: StreamDispatcher | None = None) -> FastAPI:
    """Build the API. `dispatcher` defaults to the Celery stream queue of these settings."""
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = async_client(settings.redis_url, max_connections=2048,
                                       health_check_interval=30)
        app.state.store = AsyncRequestStore(app.state.redis, settings)
        app.state.lane_facts = LaneFactsCache(settings)
        app.state.events = event_follower(settings)
        if dispatcher is None:
            app.state.dispatcher = CeleryStreamDispatcher(build_celery(settings))
        else:
            app.state.dispatcher = dispatcher
        if not settings.auth_enabled:
            log.warning("auth is OFF: ROUTER_API_KEYS is empty; every caller is tenant 'default' "
                        "(development only)")
        log.info("intake API ready", redis=safe_url(settings.redis_url),
                 upstream=settings.effective_upstream_base_url)
        # Everything built so far lives as long as the process: move it out of the collector's
        # reach so full collections stay short (they show up as p99 latency under load).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            close_dispatcher = getattr(app.state.dispatcher, "close", None)
            if close_dispatcher is not None:
                close_dispatcher()  # sends the Celery events it still holds
            await app.state.events.aclose()
            app.state.store.close()
            await app.state.redis.aclose()

    app = FastAPI(
        title="hybrid-router",
        version="0.1.0",
        description="High priority streams at once; low priority is batched at half price.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry asks the global providers (and reads the environment)
        # on every request to learn that none is configured, a cost on every request with no
        # exporter anywhere in this service. Off until the service ships telemetry.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    install_error_handlers(app)
    modules = (requests, events, chat, responses, admin, metrics, health, ui)
    for module in modules:
        app.include_router(module.router)  # at the root: their routes' paths are the app's
    # Added first, so it runs inside the body size limit (the last one added runs outermost).
    app.add_middleware(FastPaths, routes=[r for m in modules for r in m.router.routes])
    # The body's size limit and deadline hold whoever reads it (`api.http_guards`).
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.http_body_timeout_s)
    if settings.cors_origins:
        # Outermost, so every answer a browser gets (a 401, a 413, a 408 too) carries the CORS
        # headers and its page can read the error. Not installed at all when no origin is
        # allowed: no CORS headers, and no cost on the request path.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=settings.cors_allow_credentials,  # never with "*" (Settings)
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Priority",
                           "Idempotency-Key"],
            expose_headers=["X-Request-Id", "Retry-After"],
            max_age=600,
        )
    return app
