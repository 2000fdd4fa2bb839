"""Per-request directives: ``[[sim:key=value,...]]`` written inside message content.

They let one shared simulator serve many tests at once: each test shapes the behaviour of its
own prompts (fail twice with 429, drop the stream after 5 tokens, expire the batch...) without
restarting the simulator or touching global knobs. See simulator/README.md for the syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hybrid_router.simulator.messages import message_text

DIRECTIVE_RE = re.compile(r"\[\[sim:([^\]]*)\]\]")


@dataclass(slots=True)
class Directives:
    """Everything the directives of one request (or one batch line) ask for."""

    fail: int | None = None
    times: int | None = None  # None = every request of the prompt fails
    retry_after: float | None = None
    drop_after: int | None = None
    drop_times: int = 1
    tokens: int | None = None
    ttft: float | None = None
    tps: float | None = None
    line_error: int | None = None  # HTTP status of the per-line error
    batch: str | None = None  # "expire" | "fail"
    turnaround: float | None = None
    tool_calls: int | None = None  # answer with this many calls of the request's tools
    flex_429: int | None = None  # the first N flex calls of this prompt answer 429
    flex_400: bool = False  # flex calls answer 400 (the model does not support flex)
    tier: str | None = None  # serve (and report) this tier whatever was asked
    response_failed: int | None = None  # Responses: fail the response after this many tokens

    @property
    def empty(self) -> bool:
        return self == Directives()


def strip_directives(text: str) -> str:
    """The text without any directive (so directives never leak into answers)."""
    return DIRECTIVE_RE.sub("", text)


def _as_int(value: str) -> int:
    return int(float(value))


def _apply(d: Directives, key: str, value: str) -> None:
    if key == "fail":
        d.fail = _as_int(value)
    elif key == "times":
        d.times = _as_int(value)
    elif key == "retry_after":
        d.retry_after = float(value)
    elif key == "drop_after":
        d.drop_after = _as_int(value)
    elif key == "drop_times":
        d.drop_times = _as_int(value)
    elif key == "tokens":
        d.tokens = _as_int(value)
    elif key == "ttft":
        d.ttft = float(value)
    elif key == "tps":
        d.tps = float(value)
    elif key == "line_error":
        status = 500 if value.lower() in ("1", "true", "yes", "") else _as_int(value)
        d.line_error = status if status >= 400 else None
    elif key == "batch":
        d.batch = value.lower()
    elif key == "turnaround":
        d.turnaround = float(value)
    elif key == "tool_calls":
        d.tool_calls = max(0, min(_as_int(value), 16)) or None
    elif key == "flex_429":
        d.flex_429 = max(0, _as_int(value or "1000000"))
    elif key == "flex_400":
        d.flex_400 = value.lower() not in ("0", "false", "no")
    elif key == "tier":
        d.tier = value.lower() if value.lower() in ("default", "flex", "priority") else None
    elif key == "response_failed":
        d.response_failed = max(0, _as_int(value))


def parse_text(text: str, into: Directives | None = None) -> Directives:
    """Collect the directives found in ``text``; unknown keys and bad values are ignored."""
    d = into if into is not None else Directives()
    if "[[sim:" not in text:
        return d
    for match in DIRECTIVE_RE.finditer(text):
        for item in match.group(1).split(","):
            key, _, value = item.partition("=")
            try:
                _apply(d, key.strip().lower(), value.strip())
            except ValueError:
                continue
    return d


def parse_messages(messages: list[dict[str, Any]]) -> Directives:
    """Directives of a chat request: those in any non-assistant message."""
    d = Directives()
    for m in messages:
        if isinstance(m, dict) and m.get("role") != "assistant":
            parse_text(message_text(m), d)
    return d
