"""The embeddings endpoint (``POST /v1/embeddings``): deterministic vectors with usage.

Each input's vector comes from a hash of the seed, the model and the input (text, or token ids):
the same input always gets the same unit-length vector, whether alone, in a list, or in a batch.
Its dimension is ``dimensions`` when the request asks for one, else
``SimConfig.embedding_dimensions``. ``encoding_format`` ``float`` (JSON numbers, float32
values) or ``base64`` (little-endian float32 bytes, what the openai SDK asks for by default).
Directives (``[[sim:fail=429]]``...) are read from the text inputs.
"""

from __future__ import annotations

import base64
import hashlib
import random
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from hybrid_router.simulator.directives import Directives, parse_text
from hybrid_router.simulator.errors import invalid_request

EMBEDDINGS_PATH = "/v1/embeddings"
MAX_INPUTS = 2048
MAX_DIMENSIONS = 8192


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str | list[int]]
    dimensions: int
    encoding: str  # "float" | "base64"


def parse_request(body: dict[str, Any], default_dimensions: int) -> EmbeddingRequest:
    """Check an embeddings body the way OpenAI does (400 with the parameter named)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request("you must provide a model parameter", "model",
                              "missing_required_parameter")
    raw = body.get("input")
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool)
                                               for x in raw):
        inputs = [list(raw)]
    elif isinstance(raw, list) and raw and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)) for x in raw):
        inputs = list(raw)
    else:
        raise invalid_request("'input' must be a string, an array of strings, an array of "
                              "token ids or an array of token-id arrays, and not empty.",
                              "input", "invalid_type")
    if len(inputs) > MAX_INPUTS:
        raise invalid_request(f"'input' holds {len(inputs)} items; at most {MAX_INPUTS}.",
                              "input", "array_above_max_length")
    if any(x == "" for x in inputs):
        raise invalid_request("'input' cannot contain an empty string.", "input")
    dims = body.get("dimensions", default_dimensions)
    if dims is None:
        dims = default_dimensions
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_DIMENSIONS:
        raise invalid_request(f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.",
                              "dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid_request("'encoding_format' must be 'float' or 'base64'.",
                              "encoding_format")
    return EmbeddingRequest(model, inputs, dims, encoding)


def directives(req: EmbeddingRequest) -> Directives:
    d = Directives()
    for item in req.inputs:
        if isinstance(item, str):
            parse_text(item, d)
    return d


def prompt_messages(req: EmbeddingRequest) -> list[dict[str, Any]]:
    """The request as chat messages, for the simulator's per-prompt counters and hash."""
    return [{"role": "user", "content": x if isinstance(x, str) else orjson.dumps(x).decode()}
            for x in req.inputs]


def input_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else max(1, len(item.split()))


def vector(seed: int, model: str, item: str | list[int], dimensions: int) -> list[float]:
    """The unit vector of one input, as float32 values."""
    key = item if isinstance(item, str) else orjson.dumps(item).decode()
    digest = hashlib.sha256(f"{seed}\0{model}\0{key}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def embeddings_body(req: EmbeddingRequest, seed: int) -> dict[str, Any]:
    """The ``list`` object answering `req`."""
    data = []
    for i, item in enumerate(req.inputs):
        vec = vector(seed, req.model, item, req.dimensions)
        emb: list[float] | str = vec
        if req.encoding == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    tokens = sum(input_tokens(x) for x in req.inputs)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
