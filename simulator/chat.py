"""Chat-completion wire objects: ``chat.completion`` bodies and pre-encoded SSE chunks.

Shared by the live endpoint and the batch output so both look exactly like OpenAI's. The SSE
encoder builds the constant prefix and suffix of a ``chat.completion.chunk`` once per stream and
splices in the orjson-encoded token, which keeps per-chunk work to a couple of byte joins.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from hybrid_router.simulator.generation import Answer

SYSTEM_FINGERPRINT = "fp_sim0001"
DONE = b"data: [DONE]\n\n"

_TOKEN_CACHE: dict[str, bytes] = {}
_TOKEN_CACHE_MAX = 50_000


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_urlsafe(21).replace("-", "a").replace("_", "b")


def request_id() -> str:
    return "req_" + secrets.token_hex(16)


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def completion_body(answer: Answer, model: str, cid: str, created: int,
                    service_tier: str = "default") -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None if answer.tool_calls else answer.content,
                    "refusal": None,
                    "annotations": [],
                    **({"tool_calls": answer.tool_calls} if answer.tool_calls else {}),
                },
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": usage_dict(answer.prompt_tokens, answer.completion_tokens),
        "service_tier": service_tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def encode_token(token: str) -> bytes:
    """orjson-encoded JSON string of a token, cached (the vocabulary is small)."""
    enc = _TOKEN_CACHE.get(token)
    if enc is None:
        enc = orjson.dumps(token)
        if len(_TOKEN_CACHE) < _TOKEN_CACHE_MAX:
            _TOKEN_CACHE[token] = enc
    return enc


class ChunkEncoder:
    """Builds the SSE bytes of one stream's ``chat.completion.chunk`` events."""

    __slots__ = ("_base", "_content_prefix", "_content_suffix", "_usage_field", "include_usage")

    def __init__(self, model: str, cid: str, created: int, include_usage: bool,
                 service_tier: str = "default") -> None:
        self.include_usage = include_usage
        head = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": service_tier,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        # b'data: {"id":...,"system_fingerprint":"..."' -- without the closing brace.
        self._base = b"data: " + orjson.dumps(head)[:-1]
        self._usage_field = b',"usage":null' if include_usage else b""
        self._content_prefix = self._base + b',"choices":[{"index":0,"delta":{"content":'
        self._content_suffix = (
            b'},"logprobs":null,"finish_reason":null}]' + self._usage_field + b"}\n\n"
        )

    def _choice(self, choice: dict[str, Any]) -> bytes:
        return (
            self._base + b',"choices":[' + orjson.dumps(choice) + b"]" + self._usage_field
            + b"}\n\n"
        )

    def role(self) -> bytes:
        return self._choice(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "", "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def token(self, token: str) -> bytes:
        return self._content_prefix + encode_token(token) + self._content_suffix

    def tokens(self, tokens: list[str]) -> bytes:
        pre, suf = self._content_prefix, self._content_suffix
        return b"".join([pre + encode_token(t) + suf for t in tokens])

    def tool_deltas(self, deltas: list[dict[str, Any]]) -> bytes:
        """One chunk per tool-call delta (``delta.tool_calls`` holds that one fragment)."""
        return b"".join(self._choice({"index": 0, "delta": {"tool_calls": [delta]},
                                      "logprobs": None, "finish_reason": None})
                        for delta in deltas)

    def finish(self, finish_reason: str) -> bytes:
        return self._choice(
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        )

    def done(self) -> bytes:
        return DONE

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (
            self._base + b',"choices":[],"usage":'
            + orjson.dumps(usage_dict(prompt_tokens, completion_tokens)) + b"}\n\n"
        )
