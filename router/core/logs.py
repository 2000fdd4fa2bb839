"""structlog, configured once per process: JSON lines in production, console in a terminal.

Secrets never reach a log line: `redact_secrets` masks any field whose name looks like a key or
an Authorization header, and bearer tokens inside strings.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from hybrid_router.settings import Settings

_SECRET_NAMES = re.compile(r"(api[_-]?key|authorization|secret|password|token_value)", re.I)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+", re.I)
_SK = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")

_configured = False


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-looking fields and bearer tokens in strings."""
    for key, value in list(event_dict.items()):
        if _SECRET_NAMES.search(key):
            event_dict[key] = "***"
        elif isinstance(value, str):
            event_dict[key] = _SK.sub("sk-***", _BEARER.sub(r"\1***", value))
    return event_dict


def configure_logging(settings: Settings, *, force: bool = False) -> None:
    """Set up structlog and route stdlib logging (uvicorn, celery) through the same handler."""
    global _configured
    if _configured and not force:
        return
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stderr.isatty()
    )
    level = getattr(logging, settings.log_level)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        # format_exc_info turns the exc_info of Celery's and uvicorn's records into a traceback
        # string, so JSON lines keep the traceback instead of an object repr.
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.processors.format_exc_info], processor=renderer
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    _configured = True


def get_logger(name: str | None = None, **bound: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger, with fields (e.g. ``request_id``) bound."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger.bind(**bound) if bound else logger
