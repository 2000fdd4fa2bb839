"""Knobs of the upstream simulator.

One pydantic-settings class so that the same knobs are reachable as CLI flags (``python -m
simulator --ttft-s 0.2``), as environment variables (``SIM_TTFT_S=0.2``) and as keyword overrides
in tests (``running_simulator(ttft_s=0.2)``). Rates are probabilities in ``0..1`` drawn from an
RNG seeded by ``seed`` so that a fault pattern is reproducible run after run.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SimConfig(BaseSettings):
    """Everything that shapes how the simulated OpenAI upstream behaves."""

    model_config = SettingsConfigDict(env_prefix="SIM_", extra="ignore", validate_default=True)

    # --- identity ------------------------------------------------------------------------------
    models: list[str] = Field(
        default_factory=lambda: ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1", "sim-small"],
        description="Model ids listed by GET /v1/models (any model name is accepted anyway).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted bearer keys; empty = any key (a bearer header is still required).",
    )
    seed: int = Field(0, description="Seed of the fault-injection RNG and of answer generation.")

    # --- streaming timing ----------------------------------------------------------------------
    ttft_s: float = Field(0.0, ge=0, description="Time to first token, seconds.")
    tokens_per_s: float = Field(0.0, ge=0, description="Tokens per second (0 = as fast as possible).")
    min_tokens: int = Field(20, ge=1, description="Shortest default answer, in tokens.")
    max_tokens: int = Field(60, ge=1, description="Longest default answer, in tokens.")
    embedding_dimensions: int = Field(
        256, ge=1, le=8192,
        description="Length of an embedding vector when the request asks for no dimensions.",
    )

    # --- faults (rates 0..1) ---------------------------------------------------------------------
    rate_429: float = Field(0.0, ge=0, le=1, description="Share of chat requests answered 429.")
    rate_500: float = Field(0.0, ge=0, le=1, description="Share of chat requests answered 500.")
    rate_503: float = Field(0.0, ge=0, le=1, description="Share of chat requests answered 503.")
    retry_after_s: float = Field(1.0, ge=0, description="retry-after sent with 429 and 503.")
    rate_drop: float = Field(
        0.0, ge=0, le=1, description="Share of streams whose connection drops mid-stream."
    )
    drop_after_tokens: int = Field(
        5, ge=0, description="Content tokens sent before a rate-injected drop."
    )

    # --- service tiers (``service_tier``: default, flex, priority) ------------------------------
    flex_slowdown: float = Field(
        3.0, ge=1, description="A flex call is this many times slower (time to first token and "
        "time per token) than a standard one."
    )
    flex_min_ttft_s: float = Field(
        0.0, ge=0, description="Shortest time to first token of a flex call (so flex is slower "
        "even when the standard tier answers at once)."
    )
    priority_speedup: float = Field(
        2.0, ge=1, description="A priority call is this many times faster than a standard one."
    )
    flex_rate_429: float = Field(
        0.0, ge=0, le=1, description="Share of flex calls answered 429 resource unavailable."
    )
    flex_max_concurrency: int = Field(
        0, ge=0, description="Flex calls in flight above which a flex call is answered 429 "
        "resource unavailable; 0 = no limit."
    )
    no_flex_models: list[str] = Field(
        default_factory=list, description="Models without flex: a flex call for one is answered "
        "400 (invalid service_tier)."
    )

    # --- batch API -------------------------------------------------------------------------------
    batch_api: bool = Field(True, description="False = /v1/files and /v1/batches answer 404.")
    batch_turnaround_s: float = Field(
        2.0, ge=0, description="Seconds from batch creation to a terminal state."
    )
    batch_cancel_s: float = Field(
        0.2, ge=0, description="Seconds a batch stays 'cancelling' before 'cancelled'."
    )
    batch_fail_rate: float = Field(0.0, ge=0, le=1, description="Share of batches failing validation.")
    batch_expire_rate: float = Field(0.0, ge=0, le=1, description="Share of batches that expire.")
    batch_expire_done_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of lines that completed before a batch expired."
    )
    line_error_rate: float = Field(
        0.0, ge=0, le=1, description="Share of batch lines answered with a per-line 500 error."
    )
    batch_max_lines: int = Field(50_000, ge=1, description="Most request lines in one batch.")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1, description="Largest batch input file.")
