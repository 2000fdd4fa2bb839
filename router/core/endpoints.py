"""The upstream endpoints a request may be for, and what differs between them.

A request names its endpoint (`RequestRecord.endpoint`); the lanes are the same for all three
and the endpoint only decides how a lane talks to the upstream and reads its answer:

- ``/v1/chat/completions`` (the default): streamed token by token; result = the message.
- ``/v1/responses``: streamed as the upstream's own Responses events, relayed unchanged
  (``response`` events); result = the final Response object (``result.response``) and its text.
- ``/v1/embeddings``: one plain call (there is no streaming); result = the upstream's ``list``
  object (``result.response``); usage counts input tokens only.

The batch lane keeps one queue per endpoint and model (`batch_queue`), because an upstream
batch holds one endpoint and one model.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Endpoint = Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]
CHAT: Endpoint = "/v1/chat/completions"
RESPONSES: Endpoint = "/v1/responses"
EMBEDDINGS: Endpoint = "/v1/embeddings"
ENDPOINTS: tuple[str, ...] = get_args(Endpoint)

# Between the endpoint and the model in a batch queue's name (a chat queue is the bare model).
_QUEUE_SEP = "|"


def batch_queue(endpoint: str, model: str) -> str:
    """The name of the batch queue (`Keys.pending`) of `endpoint` and `model`: the model
    itself for chat completions (so queues of chat requests keep their names), else
    ``<endpoint>|<model>``."""
    return model if endpoint == CHAT else f"{endpoint}{_QUEUE_SEP}{model}"


def split_queue(name: str) -> tuple[Endpoint, str]:
    """(endpoint, model) of a batch queue name (`batch_queue`'s inverse)."""
    for endpoint in (RESPONSES, EMBEDDINGS):
        head = endpoint + _QUEUE_SEP
        if name.startswith(head):
            return endpoint, name[len(head):]
    return CHAT, name


def upstream_path(endpoint: str) -> str:
    """The path under the upstream's base URL (which ends in ``/v1``)."""
    return endpoint.removeprefix("/v1")


def normal_usage(usage: Any) -> dict[str, int] | None:
    """Any endpoint's usage as the router prices it: ``prompt_tokens`` and
    ``completion_tokens`` (the Responses API says ``input_tokens`` / ``output_tokens``;
    embeddings have input tokens only)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    p = int(prompt) if isinstance(prompt, int) else 0
    c = int(completion) if isinstance(completion, int) else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def response_text(response: dict[str, Any]) -> str:
    """The text of a Response object's output messages (what the SDK's ``output_text`` is)."""
    parts: list[str] = []
    for item in response.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or ():
                if isinstance(part, dict) and part.get("type") == "output_text":
                    parts.append(str(part.get("text") or ""))
    return "".join(parts)


def result_from_body(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The record's `result` and priced usage from an upstream answer of any endpoint (told
    apart by its ``object``: ``chat.completion``, ``response`` or an embeddings ``list``)."""
    kind = body.get("object")
    if kind == "response":
        usage = normal_usage(body.get("usage"))
        status = body.get("status")
        return {"content": response_text(body), "finish_reason": status, "usage": usage,
                "response": body}, usage
    if kind == "list":
        usage = normal_usage(body.get("usage"))
        return {"content": "", "finish_reason": "stop", "usage": usage, "response": body}, usage
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = body.get("usage")
    return {"content": message.get("content") or "", "finish_reason": choice.get("finish_reason"),
            "usage": usage, "message": message}, usage
