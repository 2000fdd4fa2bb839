"""The one ``Settings`` object of hybrid-router.

Every knob lives here, is read once (env prefix ``ROUTER_``, optional ``.env`` file) and is passed
down explicitly. Nothing else in the code reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import json
import os
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BatchMode = Literal["native", "emulated", "auto"]
Route = Literal["stream", "batch"]


class ModelPrice(BaseModel):
    """Standard (non-batch) price of a model, in USD per one million tokens."""

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)


DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60")),
    "gpt-4o": ModelPrice(input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00")),
    "gpt-4.1-mini": ModelPrice(input_per_mtok=Decimal("0.40"), output_per_mtok=Decimal("1.60")),
    "gpt-4.1": ModelPrice(input_per_mtok=Decimal("2.00"), output_per_mtok=Decimal("8.00")),
    # The price used for any model not in the table (kept deliberately non-zero so budgets work).
    "*": ModelPrice(input_per_mtok=Decimal("1.00"), output_per_mtok=Decimal("4.00")),
}

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Metrics and ledger label of every model the operator did not name (`Settings.model_label`).
OTHER_MODEL = "other"


class Settings(BaseSettings):
    """All configuration of the router, its workers and its CLI."""

    model_config = SettingsConfigDict(
        env_prefix="ROUTER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- connections -------------------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for queues, records, channels and the Celery broker.",
    )
    key_prefix: str = Field("hr", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    upstream_base_url: str | None = Field(
        None, description="OpenAI-compatible upstream; falls back to OPENAI_BASE_URL, then OpenAI."
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="Upstream key; falls back to OPENAI_API_KEY."
    )
    upstream_timeout_s: float = Field(60.0, gt=0)

    # --- routing -----------------------------------------------------------------------------
    normal_route: Route = "stream"
    batch_mode: BatchMode = "auto"
    flush_interval_s: float = Field(60.0, gt=0, description="Seconds between batch flushes.")
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between polls of batches.")
    expected_batch_turnaround_s: float = Field(
        3600.0, gt=0, description="How long a batch is expected to take, used for deadlines."
    )
    flush_early_threshold: int = Field(
        10_000, ge=1, description="A model queue this long is flushed without waiting."
    )
    batch_max_requests: int = Field(50_000, ge=1, le=50_000)
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    batch_completion_window: Literal["24h"] = "24h"
    batch_max_attempts: int = Field(3, ge=1, description="Batch submissions before giving up.")
    emulated_concurrency: int = Field(16, ge=1, le=1024)
    batch_lock_ttl_s: float = Field(
        30.0, gt=0, description="Lease of the flush/poll locks (renewed while held); bounds "
        "how long a killed batch worker blocks the next flush or poll."
    )

    # --- stream lane -------------------------------------------------------------------------
    stream_max_retries: int = Field(3, ge=0, le=20)
    retry_backoff_base_s: float = Field(0.5, gt=0)
    retry_backoff_max_s: float = Field(20.0, gt=0)
    stream_idle_timeout_s: float = Field(60.0, gt=0, description="Longest wait between tokens.")
    stream_total_timeout_s: float = Field(900.0, gt=0, description="Longest one stream may run.")
    stream_worker_concurrency: int = Field(
        512, ge=1, le=4096, description="Most streams one stream worker process runs at once."
    )
    stream_lease_s: float = Field(15.0, gt=0, description="Heartbeat lease of a running stream.")
    stream_redispatch_after_s: float = Field(
        60.0, gt=0, description="A dispatched request not picked up this long is sent again."
    )
    stream_resume: bool = Field(
        True, description="Continue a stream whose worker died (or whose upstream connection "
        "dropped) with the text so far as an assistant prefill; false where the upstream cannot "
        "continue a message (the request then fails with the partial content)."
    )
    stream_redis_grace_s: float = Field(
        30.0, gt=0, le=600, description="How long a running stream rides out a Redis outage "
        "(tokens kept in memory, writes retried) before it gives up."
    )
    fault_stall_after_take_s: float = Field(
        0.0, ge=0, description="Fault injection for tests: a stream engine waits this long between "
        "taking a message and claiming it. Always 0 in production."
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="Seconds between SSE keep-alives.")

    # --- storage -----------------------------------------------------------------------------
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    replay_ttl_s: int = Field(24 * 3600, ge=10)
    replay_maxlen: int = Field(100_000, ge=100)
    replay_grace_s: int = Field(
        60, ge=0, description="Seconds a finished request keeps its full replay log; then the "
        "log and the seq counter go and the record is repacked compactly (zlib), keeping what a "
        "late subscriber needs: the whole text and the final event, Last-Event-ID honoured."
    )
    keep_body: bool = Field(
        True, description="Keep the request body in the record once the request is finished "
        "(false: only the result is kept, from the compaction after ROUTER_REPLAY_GRACE_S)."
    )

    # --- money -------------------------------------------------------------------------------
    prices: dict[str, ModelPrice] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    batch_discount: Decimal = Field(Decimal("0.5"), ge=0, le=1)

    # --- intake ------------------------------------------------------------------------------
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant. Empty turns auth off (dev only)."
    )
    admin_tenants: list[str] = Field(
        default_factory=lambda: ["admin"],
        description="Tenants allowed to call /v1/admin/* when auth is on.",
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send a request's headers within this long "
        "(of opening, or of the previous response); else 408 and closed."
    )
    http_body_timeout_s: float = Field(
        30.0, gt=0, description="A request's whole body must arrive within this long of its "
        "headers; else 408 and closed."
    )
    allowed_models: list[str] = Field(default_factory=list)
    default_model: str = "gpt-4o-mini"
    rate_limit_rpm: int = Field(0, ge=0, description="Requests per minute per key; 0 = off.")
    rate_limit_tpm: int = Field(0, ge=0, description="Tokens per minute per key; 0 = off.")

    # --- notifications -----------------------------------------------------------------------
    callback_allowed_hosts: list[str] = Field(default_factory=list)
    callback_secret: SecretStr | None = None
    callback_max_attempts: int = Field(5, ge=1)

    # --- operations --------------------------------------------------------------------------
    flower_basic_auth: SecretStr | None = Field(
        None, description="Flower basic auth as 'user:password' (comma-separate several)."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token GET /metrics requires (401 without it); unset = open."
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_redis(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "must be a Redis URL such as redis://127.0.0.1:6379/0 "
                f"(got scheme {parsed.scheme!r})"
            )
        if parsed.scheme != "unix" and not parsed.hostname:
            raise ValueError("must name a host, e.g. redis://127.0.0.1:6379/0")
        try:
            _ = parsed.port
        except ValueError as exc:
            raise ValueError(f"has an invalid port: {exc}") from exc
        db = parsed.path.lstrip("/")
        if parsed.scheme != "unix" and db and not db.isdigit():
            raise ValueError(f"database must be a number, got {db!r}")
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if urlparse(value).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _fallbacks(self) -> Settings:
        if self.upstream_base_url is None and os.environ.get("OPENAI_BASE_URL"):
            self.upstream_base_url = os.environ["OPENAI_BASE_URL"].rstrip("/")
        if self.upstream_api_key is None and os.environ.get("OPENAI_API_KEY"):
            self.upstream_api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        if "*" not in self.prices:
            self.prices["*"] = DEFAULT_PRICES["*"]
        if self.retry_backoff_max_s < self.retry_backoff_base_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_base_s")
        return self

    # --- derived -----------------------------------------------------------------------------
    @property
    def effective_upstream_base_url(self) -> str:
        return self.upstream_base_url or OPENAI_DEFAULT_BASE_URL

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def price_for(self, model: str) -> ModelPrice:
        return self.prices.get(model) or self.prices["*"]

    def model_label(self, model: str) -> str:
        """The name a model is counted under in metrics and the ledger: itself when the
        operator named it (`allowed_models` or the price table), else `other`. Tenants choose
        model names, so only this bounded set may become label values or ledger fields."""
        if model != "*" and (model in self.prices or model in self.allowed_models):
            return model
        return OTHER_MODEL

    def safe_dump(self) -> dict[str, Any]:
        """The settings as a dict with every secret masked, for banners and `status`."""
        data = self.model_dump(mode="json")
        for secret in ("upstream_api_key", "callback_secret", "flower_basic_auth",
                       "metrics_token"):
            if data.get(secret):
                data[secret] = "***"
        data["api_keys"] = {f"***{i}": tenant for i, tenant in enumerate(self.api_keys.values())}
        return data


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings once per process (entry points call this; libraries take `Settings`)."""
    return Settings()


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The ``ROUTER_*`` environment that reproduces `settings` in a child process.

    Used to start workers, beat and the API as subprocesses with exactly the parent's settings.
    """
    env: dict[str, str] = {}
    data = settings.model_dump(mode="json")
    for name, value in data.items():
        if value is None:
            continue
        if name == "upstream_api_key" and settings.upstream_api_key is not None:
            value = settings.upstream_api_key.get_secret_value()
        elif name == "callback_secret" and settings.callback_secret is not None:
            value = settings.callback_secret.get_secret_value()
        elif name == "flower_basic_auth" and settings.flower_basic_auth is not None:
            value = settings.flower_basic_auth.get_secret_value()
        elif name == "metrics_token" and settings.metrics_token is not None:
            value = settings.metrics_token.get_secret_value()
        env[f"ROUTER_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        )
    return env


def describe_settings_error(exc: Exception) -> str:
    """One line naming each bad setting and why, for a clean exit at start-up."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc).replace("\n", " ")
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        env = f"ROUTER_{str(err['loc'][0]).upper()}" if err.get("loc") else "ROUTER_*"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{name} ({env}): {message}")
    return "; ".join(problems)
