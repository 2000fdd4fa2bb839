"""The three endpoints a request (or a batch line) may name, answered the same way live and in a
batch: `answer_line` gives a batch line the body (and usage) the live endpoint would return."""

from __future__ import annotations

import time
from typing import Any

from hybrid_router.simulator.chat import completion_body, completion_id
from hybrid_router.simulator.config import SimConfig
from hybrid_router.simulator.directives import Directives, parse_messages
from hybrid_router.simulator.embeddings import EMBEDDINGS_PATH, embeddings_body, parse_request
from hybrid_router.simulator.embeddings import directives as embedding_directives
from hybrid_router.simulator.errors import SimError
from hybrid_router.simulator.generation import Answer, make_answer
from hybrid_router.simulator.responses import (
    RESPONSES_PATH,
    ResponseBuilder,
    chat_view,
    input_messages,
    output_limit,
)
from hybrid_router.simulator.tools import tool_call_answer

CHAT_PATH = "/v1/chat/completions"
ENDPOINTS = (CHAT_PATH, RESPONSES_PATH, EMBEDDINGS_PATH)


def answer_for_response(body: dict[str, Any], model: str, messages: list[dict[str, Any]],
                        limit: int | None, d: Directives, config: SimConfig) -> Answer:
    """The answer to a Responses request: its tool calls when it asks for them, else text."""
    return tool_call_answer(chat_view(body, messages), model, config.seed, d) or make_answer(
        messages, model, seed=config.seed, length=d.tokens, limit=limit,
        min_tokens=config.min_tokens, max_tokens=config.max_tokens)


def line_problem(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why a batch line's body is not a request of `endpoint` (None when it is)."""
    if endpoint == CHAT_PATH:
        if not isinstance(body.get("messages"), list):
            return "The body must be a chat completion request with 'messages'."
        return None
    try:
        if endpoint == RESPONSES_PATH:
            input_messages(body)
            output_limit(body)
        else:
            parse_request(body, 1)
    except SimError as err:
        return err.message
    return None


def line_directives(endpoint: str, body: dict[str, Any]) -> Directives:
    if endpoint == CHAT_PATH:
        return parse_messages(body["messages"])
    if endpoint == RESPONSES_PATH:
        return parse_messages(input_messages(body))
    return embedding_directives(parse_request(body, 1))


def answer_line(endpoint: str, body: dict[str, Any], config: SimConfig,
                created: int) -> tuple[dict[str, Any], int, int]:
    """(response body, input tokens, output tokens) of one valid batch line."""
    model = str(body["model"])
    if endpoint == EMBEDDINGS_PATH:
        out = embeddings_body(parse_request(body, config.embedding_dimensions), config.seed)
        return out, int(out["usage"]["prompt_tokens"]), 0
    if endpoint == RESPONSES_PATH:
        messages = input_messages(body)
        d = parse_messages(messages)
        answer = answer_for_response(body, model, messages, output_limit(body), d, config)
        builder = ResponseBuilder(body, model, answer, created or int(time.time()))
        return builder.response(True), answer.prompt_tokens, answer.completion_tokens
    d = parse_messages(body["messages"])
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    answer = tool_call_answer(body, model, config.seed, d) or make_answer(
        body["messages"], model, seed=config.seed, length=d.tokens,
        limit=limit if isinstance(limit, int) and limit > 0 else None,
        min_tokens=config.min_tokens, max_tokens=config.max_tokens,
    )
    return (completion_body(answer, model, completion_id(), created), answer.prompt_tokens,
            answer.completion_tokens)
