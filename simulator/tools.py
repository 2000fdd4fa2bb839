"""Deterministic tool calls: ``[[sim:tool_calls=N]]`` makes the answer call the request's tools.

An agent loop sends ``tools`` and a prompt; the model answers with tool calls (no content,
``finish_reason: "tool_calls"``); the agent runs them and sends the conversation back with an
``assistant`` message holding the calls and one ``tool`` message per result, and the model
answers in text. The simulator plays that: with the directive, a request that offers
``tools`` and does not end with a ``tool`` message gets N calls (of its tools in order, cycling),
each with a deterministic id and JSON arguments; any other request gets the usual text answer.
Streamed, each call is one delta with its id, type and name, then its arguments in fragments,
as OpenAI sends them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from hybrid_router.simulator.directives import Directives
from hybrid_router.simulator.generation import Answer, count_prompt_tokens, full_answer

ARGUMENT_FRAGMENT_CHARS = 8


def _tool_names(body: dict[str, Any]) -> list[str]:
    names = []
    for tool in body.get("tools") or ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def tool_call_answer(body: dict[str, Any], model: str, seed: int, d: Directives
                     ) -> Answer | None:
    """The tool-call answer `d` asks for, or None when the request gets a text answer."""
    messages: list[dict[str, Any]] = body["messages"]
    names = _tool_names(body)
    if not d.tool_calls or not names or messages[-1].get("role") == "tool":
        return None
    words = full_answer(messages, model, seed, None, 6, 6)
    digest = hashlib.sha256(orjson.dumps([seed, model, words])).hexdigest()
    calls: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    for i in range(d.tool_calls):
        name = names[i % len(names)]
        arguments = orjson.dumps({"query": "".join(words[i % 3:]).strip(), "n": i}).decode()
        call_id = f"call_{digest[i * 2:i * 2 + 24]}"
        calls.append({"id": call_id, "type": "function",
                      "function": {"name": name, "arguments": arguments}})
        deltas.append({"index": i, "id": call_id, "type": "function",
                       "function": {"name": name, "arguments": ""}})
        deltas += [{"index": i, "function": {"arguments": arguments[j:j + ARGUMENT_FRAGMENT_CHARS]}}
                   for j in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS)]
    return Answer(tokens=[], finish_reason="tool_calls",
                  prompt_tokens=count_prompt_tokens(messages), tool_calls=calls,
                  tool_deltas=deltas)
