"""Reading an upstream chat-completion stream as raw SSE, for the stream lane's hot path.

The request is made by the official `openai` SDK (`with_streaming_response`: base URL, auth,
headers and HTTP errors mapped to `openai.APIStatusError` exactly as usual); only the body is
read here. Two reasons:

- the sync SDK stream stops reading at ``data: [DONE]`` and closes the response before the
  chunked body's end, so HTTP/1.1 keep-alive is lost and every stream pays a new TCP (and, on a
  real upstream, TLS) handshake before its first token; reading to the end keeps the
  connection in the pool;
- each chunk becomes a plain dict (orjson) instead of a pydantic model, which is most of the
  per-token CPU of a worker relaying hundreds of streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson

try:  # the SDK's transport (newer SDKs use the httpx2 fork, older ones httpx itself)
    import httpx2

    _HTTPX2_ERRORS: tuple[type[BaseException], ...] = (httpx2.TransportError,)
    _HTTPX2_TIMEOUTS: tuple[type[BaseException], ...] = (httpx2.TimeoutException,)
except ImportError:  # pragma: no cover - depends on the installed SDK
    _HTTPX2_ERRORS = ()
    _HTTPX2_TIMEOUTS = ()

# A transport failure while reading the body: the stream was cut short.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    *_HTTPX2_ERRORS,
    openai.APIConnectionError,
    ConnectionError,
)

# The subset of those that are timeouts (idle timeout between chunks, connect timeout).
TIMEOUT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    *_HTTPX2_TIMEOUTS,
    openai.APITimeoutError,
)


class UpstreamStreamError(openai.APIError):
    """An ``{"error": ...}`` object sent inside the stream by the upstream."""


def iter_chunks(response: Any) -> Iterator[dict[str, Any]]:
    """The JSON chunks of an SSE chat-completion stream; reads the body to its end."""
    done = False
    for line in response.iter_lines():
        if done or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True  # keep reading: the rest of the body lets the connection be reused
            continue
        chunk = orjson.loads(data)
        if isinstance(chunk, dict) and chunk.get("error"):
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamStreamError(str(message or "error inside the stream"),
                                      response.http_request, body=error)
        yield chunk
