"""Run the simulator under uvicorn (httptools parser, uvloop when available).

Access logs are off and the log level is ``warning``: the simulator is a test fixture and a
benchmark target, and per-request logging would dominate its cost.
"""

from __future__ import annotations

import logging

import uvicorn

from hybrid_router.simulator.app import create_app
from hybrid_router.simulator.config import SimConfig

_DROP_MESSAGE = "ASGI callable returned without completing response."


class _DropFilter(logging.Filter):
    """Hide uvicorn's complaint about the connection drops the simulator injects on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _DROP_MESSAGE not in record.getMessage()


def _loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _http() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def serve(host: str, port: int, config: SimConfig) -> None:
    """Serve the simulator on ``host:port`` until interrupted (blocking)."""
    uv_config = uvicorn.Config(
        create_app(config),
        host=host,
        port=port,
        loop=_loop(),
        http=_http(),
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(uv_config)
    logging.getLogger("uvicorn.error").addFilter(_DropFilter())
    server.run()
