"""Tool-call deltas of a chat-completion stream: merged for relaying, accumulated for results.

OpenAI streams a tool call as fragments of ``choices[0].delta.tool_calls``: the first of each
call carries its ``index``, ``id``, ``type`` and ``function.name`` (and maybe the start of
``function.arguments``), later ones only ``index`` and more ``function.arguments``. The stream
lane relays them as ``tool_calls`` events (`hybrid_router.router.core.events.tool_calls`) and keeps the whole
calls for the request's result.
"""

from __future__ import annotations

import copy
from typing import Any


def _arguments(fragment: dict[str, Any]) -> str:
    function = fragment.get("function")
    value = function.get("arguments") if isinstance(function, dict) else None
    return value if isinstance(value, str) else ""


def merge_deltas(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`fragments` with each run of fragments of one call joined into one delta (its first
    fragment's id, type and name, every fragment's arguments in order), so relaying several
    fragments in one event gives the client the same call as relaying them one by one."""
    merged: list[dict[str, Any]] = []
    for fragment in fragments:
        last = merged[-1] if merged else None
        if last is not None and last.get("index") == fragment.get("index") \
                and "id" not in fragment:
            function = last.setdefault("function", {})
            function["arguments"] = _arguments(last) + _arguments(fragment)
        else:
            merged.append(copy.deepcopy(fragment))
    return merged


class ToolCalls:
    """The whole tool calls of one answer, built from its stream's deltas."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._calls)

    def add(self, fragments: list[dict[str, Any]]) -> None:
        for fragment in fragments:
            index = fragment.get("index")
            if not isinstance(index, int):
                continue
            call = self._calls.setdefault(
                index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if fragment.get("id"):
                call["id"] = fragment["id"]
            if fragment.get("type"):
                call["type"] = fragment["type"]
            function = fragment.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["function"]["name"] += function["name"]
                call["function"]["arguments"] += _arguments(fragment)

    def calls(self) -> list[dict[str, Any]]:
        """The calls in index order, as ``message.tool_calls`` of a ``chat.completion``."""
        return [copy.deepcopy(self._calls[i]) for i in sorted(self._calls)]
