"""Deterministic answers: the same messages and model always produce the same tokens.

Determinism is what lets tests compare a streamed answer with a non-streamed one, and what lets
the router resume a dropped stream: the answer depends only on the messages *before* a trailing
assistant message, so a request that carries the already-received text as an assistant prefill
gets exactly the rest of the same answer. Every token is one word with a leading space, so the
content is ``"".join(tokens)`` and a token boundary is always a word boundary.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import orjson

from hybrid_router.simulator.directives import strip_directives
from hybrid_router.simulator.messages import message_text, split_prefill

_WORDS = """
lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut
labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris
nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse
cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui
officia deserunt mollit anim id est laborum router batch stream token signal queue worker
cache vector model answer
"""
VOCABULARY: tuple[str, ...] = tuple(" " + w for w in _WORDS.split())


def _canonical(messages: list[dict[str, Any]]) -> bytes:
    return orjson.dumps([[str(m.get("role", "")), message_text(m)] for m in messages])


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """Stable id of a prompt: its messages (role and text) without a trailing assistant prefill.

    Tests use it to look up per-prompt counters in ``GET /sim/stats?prompt_hash=...``.
    """
    prompt, _ = split_prefill(messages)
    return hashlib.sha256(_canonical(prompt)).hexdigest()[:32]


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Roughly what a tokenizer would say: the words of every message plus a small overhead."""
    return sum(len(message_text(m).split()) + 3 for m in messages) + 3


@dataclass(frozen=True, slots=True)
class Answer:
    """What one chat request produces.

    ``tokens`` are the tokens still to emit (after any prefill), ``finish_reason`` is ``stop``
    when the answer ends inside the budget and ``length`` when ``max_tokens`` cut it.
    """

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    # A tool-call answer (hybrid_router.simulator.tools): the whole calls, and the stream deltas they are
    # sent as (``{"index", "id", "type", "function": {"name", "arguments"}}`` fragments).
    tool_calls: list[dict[str, Any]] | None = None
    tool_deltas: list[dict[str, Any]] | None = None

    @property
    def content(self) -> str:
        return "".join(self.tokens)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) + len(self.tool_deltas or ())


def full_answer(
    prompt: list[dict[str, Any]], model: str, seed: int, length: int | None,
    min_tokens: int, max_tokens: int,
) -> list[str]:
    """The whole deterministic answer for a prompt (without any prefill)."""
    digest = hashlib.sha256(
        str(seed).encode() + b"\0" + model.encode() + b"\0" + _canonical(prompt)
    ).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    lo, hi = min(min_tokens, max_tokens), max(min_tokens, max_tokens)
    n = length if length is not None else rng.randint(lo, hi)
    # Mention a word of the prompt now and then so answers look related to their question.
    words = [w for w in strip_directives(" ".join(message_text(m) for m in prompt)).split()
             if w.isalpha()][:8]
    extra = tuple(" " + w.lower() for w in words)
    vocab = VOCABULARY + extra
    return [rng.choice(vocab) for _ in range(n)]


def remaining_after_prefill(tokens: list[str], prefill: str) -> list[str]:
    """The tokens of ``tokens`` that come after the text ``prefill``.

    When the prefill is a prefix of the answer (the normal resume case) the rest is exact, even if
    the prefill ends mid-token. Otherwise fall back to skipping as many tokens as it has words.
    """
    if not prefill:
        return list(tokens)
    full = "".join(tokens)
    if full.startswith(prefill):
        consumed = 0
        for i, tok in enumerate(tokens):
            end = consumed + len(tok)
            if end > len(prefill):
                head = tok[len(prefill) - consumed:]
                return [head, *tokens[i + 1:]] if head else list(tokens[i + 1:])
            consumed = end
        return []
    return list(tokens[len(prefill.split()):])


def make_answer(
    messages: list[dict[str, Any]], model: str, *, seed: int, length: int | None,
    limit: int | None, min_tokens: int, max_tokens: int,
) -> Answer:
    """Build the answer to a chat request, honouring a trailing prefill and ``max_tokens``."""
    prompt, prefill = split_prefill(messages)
    tokens = full_answer(prompt, model, seed, length, min_tokens, max_tokens)
    if prefill is not None:
        tokens = remaining_after_prefill(tokens, prefill)
    finish = "stop"
    if limit is not None and len(tokens) > limit:
        tokens = tokens[:limit]
        finish = "length"
    return Answer(tokens=tokens, finish_reason=finish, prompt_tokens=count_prompt_tokens(messages))
