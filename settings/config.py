"""The one ``Settings`` object of hybrid-router.

Every knob lives here, is read once (env prefix ``ROUTER_``, optional ``.env`` file) and is passed
down explicitly. Nothing else in the code reads ``os.environ`` for configuration.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from hybrid_router.settings.redis_url import SENTINEL_SCHEMES, parse_sentinel

BatchMode = Literal["native", "emulated", "auto"]
Route = Literal["stream", "batch"]


class ModelPrice(BaseModel):
    """Price of a model, in USD per one million tokens: the standard tier, and the `flex` and
    `priority` tiers where the model has them. A model supports flex exactly when it has a flex
    rate (a model without one is never sent at flex unless a client asks)."""

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    flex_input_per_mtok: Decimal | None = Field(None, ge=0)
    flex_output_per_mtok: Decimal | None = Field(None, ge=0)
    priority_input_per_mtok: Decimal | None = Field(None, ge=0)
    priority_output_per_mtok: Decimal | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _tier_rates_in_pairs(self) -> ModelPrice:
        for tier in ("flex", "priority"):
            pair = (getattr(self, f"{tier}_input_per_mtok"), getattr(self, f"{tier}_output_per_mtok"))
            if (pair[0] is None) != (pair[1] is None):
                raise ValueError(f"{tier}_input_per_mtok and {tier}_output_per_mtok go together")
        return self

    @property
    def has_flex(self) -> bool:
        return self.flex_input_per_mtok is not None

    @property
    def has_priority(self) -> bool:
        return self.priority_input_per_mtok is not None


def _price(standard: tuple[str, str], flex: tuple[str, str] | None = None,
           priority: tuple[str, str] | None = None) -> ModelPrice:
    return ModelPrice(
        input_per_mtok=Decimal(standard[0]), output_per_mtok=Decimal(standard[1]),
        flex_input_per_mtok=Decimal(flex[0]) if flex else None,
        flex_output_per_mtok=Decimal(flex[1]) if flex else None,
        priority_input_per_mtok=Decimal(priority[0]) if priority else None,
        priority_output_per_mtok=Decimal(priority[1]) if priority else None,
    )


# OpenAI's list prices (standard, flex, priority; input and output per million tokens).
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-mini": _price(("0.15", "0.60"), priority=("0.25", "1.00")),
    "gpt-4o": _price(("2.50", "10.00"), priority=("4.25", "17.00")),
    "gpt-4.1-nano": _price(("0.10", "0.40"), priority=("0.20", "0.80")),
    "gpt-4.1-mini": _price(("0.40", "1.60"), priority=("0.70", "2.80")),
    "gpt-4.1": _price(("2.00", "8.00"), priority=("3.50", "14.00")),
    "gpt-5-nano": _price(("0.05", "0.40"), flex=("0.025", "0.20")),
    "gpt-5-mini": _price(("0.25", "2.00"), flex=("0.125", "1.00"), priority=("0.45", "3.60")),
    "gpt-5": _price(("1.25", "10.00"), flex=("0.625", "5.00"), priority=("2.50", "20.00")),
    "o4-mini": _price(("1.10", "4.40"), flex=("0.55", "2.20"), priority=("2.00", "8.00")),
    "o3": _price(("2.00", "8.00"), flex=("1.00", "4.00"), priority=("3.50", "14.00")),
    # Embeddings bill input tokens only.
    "text-embedding-3-small": _price(("0.02", "0")),
    "text-embedding-3-large": _price(("0.13", "0")),
    "text-embedding-ada-002": _price(("0.10", "0")),
    # The price used for any model not in the table (kept deliberately non-zero so budgets work).
    "*": _price(("1.00", "4.00")),
}

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Metrics and ledger label of every model the operator did not name (`Settings.model_label`).
OTHER_MODEL = "other"
# A shorter flush interval is a mistake (a flush per beat tick at best), never a wish.
MIN_FLUSH_INTERVAL_S = 0.1
# The ports a callback host entry without a port allows: those of http and https.
DEFAULT_CALLBACK_PORTS: frozenset[int] = frozenset({80, 443})


@dataclass(frozen=True)
class CallbackHost:
    """One entry of `Settings.callback_allowed_hosts`: a host pattern and its ports.

    Syntax: ``host`` (ports 80 and 443 only), ``host:8443`` (that port), ``host:*`` (any
    port). ``host`` is a name, ``*.example.com``, ``*`` or an IP literal; an IPv6 literal with a
    port is bracketed (``[::1]:8080``, ``[fd00::1]:*``; bare ``::1`` means ports 80 and 443).
    """

    host: str  # lower case, no trailing dot, IPv6 without brackets
    ports: frozenset[int] | None  # None: any port

    def allows_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports


def parse_callback_host(entry: str) -> CallbackHost:
    """`entry` as a `CallbackHost`; ValueError saying what is wrong with it."""
    text = entry.strip().lower()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: an IPv6 entry is [address] or [address]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    host = host.rstrip(".")
    if not host or any(c in host for c in "/@?# "):
        raise ValueError(f"{entry!r}: must be a host name, *.domain, * or an IP address, "
                         "optionally with :port or :*")
    if port_text is None:
        return CallbackHost(host, DEFAULT_CALLBACK_PORTS)
    if port_text == "*":
        return CallbackHost(host, None)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be 1-65535 or *")
    return CallbackHost(host, frozenset({int(port_text)}))


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
        description="Redis for queues, records, channels and the Celery broker: "
        "redis://, rediss:// (TLS), unix://, or behind Sentinel "
        "sentinel://[user:password@]s1:26379,s2:26379/mymaster/0 (sentinels:// for TLS).",
    )
    redis_wait_replicas: int = Field(
        1, ge=0, le=16, description="Replicas that must have a new request before it is "
        "acknowledged (202, or a drop-in stream's first byte): Redis WAIT, only while the master "
        "reports connected replicas (none: nothing changes); 0 = do not wait."
    )
    redis_wait_timeout_ms: int = Field(
        500, ge=1, le=60000, description="Longest wait for the replicas (ROUTER_REDIS_WAIT_"
        "REPLICAS); past it the request is acknowledged anyway and a warning logged."
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
    flush_interval_s: float = Field(60.0, ge=MIN_FLUSH_INTERVAL_S,
                                    description="Seconds between batch flushes.")
    poll_interval_s: float = Field(30.0, gt=0, description="Seconds between polls of batches.")
    expected_batch_turnaround_s: float = Field(
        3600.0, gt=0, description="How long a batch is expected to take, used for deadlines."
    )
    deadline_normal_s: float = Field(
        900.0, gt=0, description="Deadline of a `normal` request that gives none (seconds): "
        "the lane chosen must be expected to finish within it."
    )
    deadline_low_s: float = Field(
        86_400.0, gt=0, description="Deadline of a `low` request that gives none (seconds)."
    )
    flex: bool = Field(
        True, description="Use the flex lane (`service_tier=flex`) for requests whose "
        "deadline it meets, on models with a flex price; false: only when a client asks."
    )
    expected_stream_latency_s: float = Field(
        10.0, gt=0, description="Starting value of the stream lane's expected latency (request "
        "to last token); replaced by the rolling figure measured per model."
    )
    expected_flex_latency_s: float = Field(
        60.0, gt=0, description="Starting value of the flex lane's expected latency; replaced "
        "by the rolling figure measured per model."
    )
    flex_max_retries: int = Field(
        3, ge=0, le=20, description="Retries of a flex call answered 429 (resource "
        "unavailable) before the request moves, once, to the standard tier or the batch lane."
    )
    flex_unsupported_ttl_s: int = Field(
        3600, ge=1, description="How long a model whose upstream refused flex (400) is sent at "
        "the standard tier without trying flex again."
    )
    priority_tier_models: list[str] = Field(
        default_factory=list, description="JSON list of models whose `high` requests are sent "
        "at the `priority` tier (faster, dearer); `*` = every model with a priority price. "
        "Empty = off."
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
    prices: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="JSON: model -> {input_per_mtok, output_per_mtok} USD, optionally "
        "flex_input_per_mtok/flex_output_per_mtok (the model supports flex) and "
        "priority_input_per_mtok/priority_output_per_mtok; `*` is the fallback.")
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
    public_base_url: str | None = Field(
        None, description="Public URL of the API (e.g. https://router.example.com) used in the "
        "events_url and result_url it answers; unset: those URLs are relative. Never taken "
        "from the request's Host header.",
    )
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

    # --- browsers ----------------------------------------------------------------------------
    stream_url_secrets: list[SecretStr] = Field(
        default_factory=list, description="JSON list of secrets signing the read-only stream "
        "URLs given out with each request (`stream_url`): the first signs, every one verifies "
        "(rotate by putting a new one first and dropping the old one once its URLs expired). "
        "Empty = no stream URLs."
    )
    stream_url_ttl_s: int = Field(
        3600, ge=10, le=7 * 24 * 3600, description="How long a signed stream URL opens the "
        "request's events (checked when a connection opens)."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="JSON list of web origins (`https://app.example`) "
        "allowed to call the API from a browser; `*` = any. Empty = no CORS headers."
    )
    cors_allow_credentials: bool = Field(
        False, description="Let browsers send cookies / HTTP auth cross-origin (never with `*`)."
    )

    # --- notifications -----------------------------------------------------------------------
    callback_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="JSON list of hosts terminal callbacks may be sent to: `host` (ports 80 and "
        "443 only), `host:port`, `host:*` (any port); `*.domain`, `*` and IP literals "
        "(`[::1]:8080`) too.",
    )
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
        if parsed.scheme in SENTINEL_SCHEMES:
            parse_sentinel(value)  # ValueError naming what is wrong
            return value
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "must be a Redis URL such as redis://127.0.0.1:6379/0 or a Sentinel URL such as "
                f"sentinel://h1:26379,h2:26379/mymaster/0 (got scheme {parsed.scheme!r})"
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

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for origin in value:
            origin = origin.strip().rstrip("/")
            parsed = urlparse(origin)
            if origin != "*" and (parsed.scheme not in ("http", "https") or not parsed.netloc
                                  or parsed.path or parsed.query):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
            out.append(origin)
        return out

    @field_validator("stream_url_secrets")
    @classmethod
    def _secrets_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        for secret in value:
            if len(secret.get_secret_value()) < 16:
                raise ValueError("each secret must be at least 16 characters long")
        return value

    @field_validator("callback_allowed_hosts")
    @classmethod
    def _callback_hosts_parse(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_callback_host(entry)
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url_is_http(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http(s) URL such as https://router.example.com")
        if parsed.query or parsed.fragment:
            raise ValueError("must have no query or fragment")
        return value.rstrip("/")

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
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError("cors_allow_credentials cannot be used with cors_origins '*': "
                             "list the origins")
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

    def flex_priced(self, model: str) -> bool:
        """Whether `model` has a flex price (the router's notion of "supports flex")."""
        price = self.prices.get(model)
        return price is not None and price.has_flex

    def priority_tier_for(self, model: str) -> bool:
        """Whether `high` requests for `model` go at the priority tier (a setting, per model)."""
        listed = model in self.priority_tier_models or (
            "*" in self.priority_tier_models and model in self.prices and model != "*")
        return listed and self.price_for(model).has_priority

    def deadline_for(self, priority: str) -> float | None:
        """The deadline a request of `priority` gets when it gives none (None: high, which
        always streams at once)."""
        if priority == "normal":
            # An operator who sends normal to the batch lane gives it low's patience.
            return self.deadline_low_s if self.normal_route == "batch" else self.deadline_normal_s
        if priority == "low":
            return self.deadline_low_s
        return None

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
        data["stream_url_secrets"] = ["***" for _ in self.stream_url_secrets]
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
        elif name == "stream_url_secrets":
            value = [s.get_secret_value() for s in settings.stream_url_secrets]
        env[f"ROUTER_{name.upper()}"] = (
            json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        )
    return env


# pydantic-settings' message when a complex value (dict / list) is not JSON; it names the
# field and the source class, not the environment variable the user has to fix.
_SOURCE_ERROR = re.compile(r'error parsing value for field "(\w+)" from source "(\w+)"')


def describe_settings_error(exc: Exception) -> str:
    """One line naming each bad setting and why, for a clean exit at start-up."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        parsed = _SOURCE_ERROR.search(str(exc))
        if parsed is not None:  # pydantic-settings could not decode a JSON value
            field_name, source = parsed.groups()
            where = " (in .env)" if "DotEnv" in source else ""
            cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            return (f"{field_name} (ROUTER_{field_name.upper()}){where}: not valid JSON"
                    f"{cause}").replace("\n", " ")
        return str(exc).replace("\n", " ")
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        env = f"ROUTER_{str(err['loc'][0]).upper()}" if err.get("loc") else "ROUTER_*"
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{name} ({env}): {message}")
    return "; ".join(problems)
