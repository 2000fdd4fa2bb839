"""The upstream client factory: one place that builds `openai` clients from `Settings`."""

from __future__ import annotations

import httpx
import openai

from hybrid_router.settings import Settings

# What a call to the upstream raises when it fails (an HTTP status, the connection, a timeout).
UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (openai.OpenAIError, httpx.HTTPError, OSError)


def upstream_answer(exc: openai.APIStatusError) -> str:
    """What the upstream answered, for an error message: its status and its own message (the
    ``error.message`` of an OpenAI error body), not the SDK's wrapping of the whole body."""
    message = exc.message
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            message = str(inner["message"])
    return f"upstream answered {exc.status_code}: {message}"


def _api_key(settings: Settings) -> str:
    # The SDK refuses to start without a key; the simulator accepts any.
    key = settings.upstream_api_key
    return key.get_secret_value() if key is not None else "sk-no-key-configured"


def make_openai_client(settings: Settings, *, max_retries: int = 0) -> openai.OpenAI:
    """A sync client. Retries are ours (see `hybrid_router.workers.retry`), so the SDK's are off by default."""
    return openai.OpenAI(
        api_key=_api_key(settings),
        base_url=settings.effective_upstream_base_url,
        timeout=settings.upstream_timeout_s,
        max_retries=max_retries,
    )


def make_async_openai_client(settings: Settings, *, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=_api_key(settings),
        base_url=settings.effective_upstream_base_url,
        timeout=settings.upstream_timeout_s,
        max_retries=max_retries,
    )
