"""Reading chat messages the way OpenAI accepts them (string or content-part list content).

Shared by prompt hashing, directive parsing and answer generation so that all three agree on
what the text of a prompt is.
"""

from __future__ import annotations

from typing import Any


def message_text(message: dict[str, Any]) -> str:
    """The text of a message whose content is a string or a list of content parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return str(content)


def split_prefill(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """Split a trailing assistant message (a resume prefill) off the prompt."""
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return messages[:-1], message_text(messages[-1])
    return messages, None
