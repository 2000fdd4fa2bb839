"""An OpenAI-compatible upstream simulator (chat completions, streaming, files, batches).

It exists so the router can be proven against the real OpenAI wire protocol with no network:
deterministic answers, realistic timing, fault injection by rate or by per-prompt directive,
and counters (``GET /sim/stats``) that let tests assert what the upstream actually saw.
"""

from hybrid_router.simulator.config import SimConfig
from hybrid_router.simulator.generation import prompt_hash

__all__ = ["SimConfig", "prompt_hash"]
