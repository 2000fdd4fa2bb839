"""Counters that tests read back through ``GET /sim/stats``.

They answer questions a black-box test cannot answer from the client side: "was the upstream
called exactly once for this prompt?", "did the stream really stop when the router cancelled?".
Counters are kept per prompt hash (see :func:`simulator.prompt_hash`) and in total.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

PROMPT_COUNTERS: tuple[str, ...] = (
    "requests",
    "errors_injected",
    "completions",
    "streams_started",
    "streams_completed",
    "streams_aborted",
    "streams_dropped",
    "continuations",
)


LAST_BODIES_MAX = 1000


class Stats:
    """Plain in-memory counters (the server is single-process, single-threaded asyncio)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = defaultdict(int)
        self.prompts: dict[str, dict[str, int]] = {}
        # The last chat body received per prompt, so a test can check what a router sent.
        self.last_bodies: dict[str, Any] = {}

    def reset(self) -> None:
        self.totals.clear()
        self.prompts.clear()
        self.last_bodies.clear()

    def keep_body(self, prompt_hash: str, body: Any) -> None:
        """Remember `body` as the prompt's last request (the newest `LAST_BODIES_MAX` kept)."""
        self.last_bodies.pop(prompt_hash, None)
        self.last_bodies[prompt_hash] = body
        if len(self.last_bodies) > LAST_BODIES_MAX:
            del self.last_bodies[next(iter(self.last_bodies))]

    def incr(self, name: str, prompt_hash: str | None = None, by: int = 1) -> None:
        self.totals[name] += by
        if prompt_hash is not None:
            per = self.prompts.get(prompt_hash)
            if per is None:
                per = self.prompts[prompt_hash] = dict.fromkeys(PROMPT_COUNTERS, 0)
            per[name] = per.get(name, 0) + by

    def for_prompt(self, prompt_hash: str) -> dict[str, Any]:
        per = self.prompts.get(prompt_hash) or dict.fromkeys(PROMPT_COUNTERS, 0)
        return {"prompt_hash": prompt_hash, **per}

    def snapshot(self) -> dict[str, Any]:
        totals = dict.fromkeys(PROMPT_COUNTERS, 0)
        totals.update(self.totals)
        return {"object": "sim.stats", "totals": totals, "prompts": dict(self.prompts)}
