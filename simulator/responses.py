"""The Responses API (``POST /v1/responses``): Response objects and their streamed events.

A Responses request is read as the chat messages it amounts to (``instructions`` as a system
message, ``input`` as a user message or as a list of message / ``function_call_output`` items),
so the answer, the prompt hash and the directives are exactly those of the same chat request:
deterministic, with usage. Streamed, the events are OpenAI's, in its order, each with a
``sequence_number``: ``response.created``, ``response.in_progress``, for a text answer
``response.output_item.added`` / ``response.content_part.added`` / one
``response.output_text.delta`` per token / ``response.output_text.done`` /
``response.content_part.done`` / ``response.output_item.done``, for a tool-call answer
(``[[sim:tool_calls=N]]`` with function ``tools``) one ``function_call`` item per call with its
arguments in ``response.function_call_arguments.delta`` fragments, and last
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut the answer;
``response.failed`` after N tokens with ``[[sim:response_failed=N]]``), whose ``response`` is
the very object a non-streamed call returns. No ``[DONE]`` line.
"""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from hybrid_router.simulator.errors import invalid_request
from hybrid_router.simulator.generation import Answer

RESPONSES_PATH = "/v1/responses"


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)


def response_id() -> str:
    return _id("resp_")


def _item_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def input_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages a Responses request amounts to (raises a 400 for a bad ``input``)."""
    raw = body.get("input")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list):
        for item in raw:
            if not isinstance(item, dict):
                raise invalid_request("Each input item must be an object.", "input")
            kind = item.get("type")
            if kind == "function_call_output":
                messages.append({"role": "tool", "content": str(item.get("output") or "")})
            elif kind == "function_call":
                messages.append({"role": "assistant", "content": None,
                                 "tool_calls": [{"id": item.get("call_id")}]})
            elif kind in (None, "message") and isinstance(item.get("role"), str):
                messages.append({"role": item["role"], "content": _item_text(item)})
    else:
        raise invalid_request("Missing required parameter: 'input'.", "input",
                              "missing_required_parameter")
    if not any(m.get("role") != "assistant" for m in messages):
        raise invalid_request("'input' must hold at least one message.", "input", "empty_array")
    return messages


def chat_view(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The request as `hybrid_router.simulator.tools.tool_call_answer` reads a chat body (function tools)."""
    tools = [{"type": "function", "function": {"name": t["name"]}}
             for t in body.get("tools") or ()
             if isinstance(t, dict) and t.get("type") == "function"
             and isinstance(t.get("name"), str)]
    return {"messages": messages, "tools": tools}


def output_limit(body: dict[str, Any]) -> int | None:
    limit = body.get("max_output_tokens")
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise invalid_request("max_output_tokens must be a positive integer.",
                              "max_output_tokens", "integer_below_min_value")
    return limit


def usage(answer: Answer) -> dict[str, Any]:
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": answer.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


class ResponseBuilder:
    """One answer's Response object and ids, shared by the streamed events and the final
    object, so a stream's ``response.completed`` is the object a plain call returns."""

    def __init__(self, body: dict[str, Any], model: str, answer: Answer, created: int) -> None:
        self.body = body
        self.model = model
        self.answer = answer
        self.created = created
        self.id = response_id()
        self.message_id = _id("msg_")
        self.call_ids = [_id("fc_") for _ in answer.tool_calls or ()]
        self.incomplete = answer.finish_reason == "length"
        self.failed = False  # `[[sim:response_failed=N]]`: the response fails after N tokens
        self.service_tier = "default"  # the tier that served it (echoed, as OpenAI does)

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return "incomplete" if self.incomplete else "completed"

    def text_part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, done: bool) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message",
                "status": self.status if done else "in_progress", "role": "assistant",
                "content": [self.text_part(self.answer.content)] if done else []}

    def call(self, i: int, done: bool) -> dict[str, Any]:
        call = (self.answer.tool_calls or [])[i]
        return {"id": self.call_ids[i], "type": "function_call",
                "status": "completed" if done else "in_progress",
                "arguments": call["function"]["arguments"] if done else "",
                "call_id": call["id"], "name": call["function"]["name"]}

    def output(self) -> list[dict[str, Any]]:
        if self.answer.tool_calls:
            return [self.call(i, True) for i in range(len(self.answer.tool_calls))]
        if self.failed:
            return []
        return [self.message(True)]

    def response(self, final: bool) -> dict[str, Any]:
        b = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status if final else "in_progress",
            "background": bool(b.get("background") or False),
            "error": ({"code": "server_error", "message": "The model failed to generate a "
                       "response (simulated)."} if final and self.failed else None),
            "incomplete_details": ({"reason": "max_output_tokens"}
                                   if final and self.incomplete and not self.failed else None),
            "instructions": b.get("instructions"),
            "max_output_tokens": b.get("max_output_tokens"),
            "metadata": b.get("metadata") or {},
            "model": self.model,
            "output": self.output() if final else [],
            "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": b.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": self.service_tier,
            "store": b.get("store", True),
            "temperature": b.get("temperature", 1.0),
            "text": b.get("text") or {"format": {"type": "text"}},
            "tool_choice": b.get("tool_choice", "auto"),
            "tools": b.get("tools") or [],
            "top_p": b.get("top_p", 1.0),
            "truncation": b.get("truncation", "disabled"),
            "usage": usage(self.answer) if final else None,
            "user": b.get("user"),
        }


class ResponsesEncoder:
    """The SSE bytes of one streamed Response, for `hybrid_router.simulator.streaming.stream_answer` (the
    same interface as `hybrid_router.simulator.chat.ChunkEncoder`)."""

    include_usage = False

    def __init__(self, builder: ResponseBuilder) -> None:
        self.b = builder
        self.seq = 0
        self.calls_open: list[int] = []

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _text_at(self) -> dict[str, Any]:
        return {"item_id": self.b.message_id, "output_index": 0, "content_index": 0}

    def role(self) -> bytes:
        b = self.b
        out = [self._event("response.created", response=b.response(False)),
               self._event("response.in_progress", response=b.response(False))]
        if not b.answer.tool_calls:
            out.append(self._event("response.output_item.added", output_index=0,
                                   item=b.message(False)))
            out.append(self._event("response.content_part.added", **self._text_at(),
                                   part=b.text_part("")))
        return b"".join(out)

    def tokens(self, tokens: list[str]) -> bytes:
        at = self._text_at()
        return b"".join(self._event("response.output_text.delta", **at, delta=t, logprobs=[])
                        for t in tokens)

    def tool_deltas(self, deltas: list[dict[str, Any]]) -> bytes:
        out: list[bytes] = []
        for delta in deltas:
            i = int(delta["index"])
            if "id" in delta:
                self.calls_open.append(i)
                out.append(self._event("response.output_item.added", output_index=i,
                                       item=self.b.call(i, False)))
                continue
            out.append(self._event("response.function_call_arguments.delta",
                                   item_id=self.b.call_ids[i], output_index=i,
                                   delta=delta["function"]["arguments"]))
        return b"".join(out)

    def finish(self, _finish_reason: str) -> bytes:
        b = self.b
        out: list[bytes] = []
        if b.failed:
            return self._event("response.failed", response=b.response(True))
        if b.answer.tool_calls:
            for i in self.calls_open:
                item = b.call(i, True)
                out.append(self._event("response.function_call_arguments.done",
                                       item_id=item["id"], output_index=i,
                                       arguments=item["arguments"]))
                out.append(self._event("response.output_item.done", output_index=i, item=item))
        else:
            text = b.answer.content
            out.append(self._event("response.output_text.done", **self._text_at(), text=text,
                                   logprobs=[]))
            out.append(self._event("response.content_part.done", **self._text_at(),
                                   part=b.text_part(text)))
            out.append(self._event("response.output_item.done", output_index=0,
                                   item=b.message(True)))
        out.append(self._event(f"response.{b.status}", response=b.response(True)))
        return b"".join(out)

    def usage(self, _prompt_tokens: int, _completion_tokens: int) -> bytes:
        return b""

    def done(self) -> bytes:
        return b""
