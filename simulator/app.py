"""The simulator as one raw ASGI application: routing, auth and the endpoint handlers (chat
completions, responses, embeddings, files, batches).

No web framework on purpose: the streaming path has to stay cheap enough that benchmarks
measure the router and not the simulator. The non-hot endpoints (files, batches, stats) reuse
the same few helpers; multipart uploads are parsed with starlette's parser, off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request

from hybrid_router.simulator.batches import BatchStore
from hybrid_router.simulator.chat import ChunkEncoder, completion_body, completion_id, request_id
from hybrid_router.simulator.config import SimConfig
from hybrid_router.simulator.directives import Directives, parse_messages
from hybrid_router.simulator.embeddings import EMBEDDINGS_PATH, embeddings_body, parse_request, prompt_messages
from hybrid_router.simulator.embeddings import directives as embedding_directives
from hybrid_router.simulator.endpoints import answer_for_response
from hybrid_router.simulator.errors import SimError, invalid_request, not_found
from hybrid_router.simulator.faults import Faults
from hybrid_router.simulator.files import FileStore
from hybrid_router.simulator.generation import make_answer, prompt_hash
from hybrid_router.simulator.httpio import Receive, Scope, Send, header, query, read_body, send_error, send_json
from hybrid_router.simulator.messages import split_prefill
from hybrid_router.simulator.responses import (
    RESPONSES_PATH,
    ResponseBuilder,
    ResponsesEncoder,
    input_messages,
    output_limit,
)
from hybrid_router.simulator.stats import Stats
from hybrid_router.simulator.streaming import stream_answer
from hybrid_router.simulator.tools import tool_call_answer

CHAT_PATH = "/v1/chat/completions"


def _int_param(q: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = q.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request(f"Invalid integer for '{name}'.", name) from None
    if not lo <= value <= hi:
        raise invalid_request(f"'{name}' must be between {lo} and {hi}.", name)
    return value


async def _json_body(receive: Receive) -> dict[str, Any]:
    raw = await read_body(receive)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    return body


class SimulatorApp:
    """ASGI callable holding all in-memory state of one simulator process."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.faults = Faults(config)
        self.files = FileStore()
        self.batches = BatchStore(config, self.files, self.faults)
        self._api_keys = frozenset(config.api_keys)
        self.flex_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        rid = request_id()
        extra = [(b"x-request-id", rid.encode())]
        try:
            await self._route(scope, receive, send, extra)
        except SimError as err:
            await send_error(send, err, extra)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- routing --------------------------------------------------------------------------------
    def _check_auth(self, scope: Scope) -> None:
        auth = header(scope, b"authorization")
        if auth is None or not auth.lower().startswith(b"bearer ") or not auth[7:].strip():
            raise SimError(401, "You didn't provide an API key. You need to provide your API key "
                           "in an Authorization header using Bearer auth "
                           "(i.e. Authorization: Bearer YOUR_KEY).", code=None)
        key = auth[7:].strip().decode("latin-1")
        if self._api_keys and key not in self._api_keys:
            raise SimError(401, f"Incorrect API key provided: {key[:3]}***.",
                           code="invalid_api_key")

    async def _route(self, scope: Scope, receive: Receive, send: Send,
                     extra: list[tuple[bytes, bytes]]) -> None:
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        if path.startswith("/sim/") or path == "/healthz":
            await self._sim(path, method, scope, receive, send)
            return
        if not path.startswith("/v1/"):
            raise not_found(f"Invalid URL ({method} {path})")
        self._check_auth(scope)
        if path == CHAT_PATH and method == "POST":
            await self._chat(scope, receive, send, extra)
            return
        if path == RESPONSES_PATH and method == "POST":
            await self._responses(receive, send, extra)
            return
        if path == EMBEDDINGS_PATH and method == "POST":
            await self._embeddings(receive, send, extra)
            return
        parts = path.split("/")[2:]  # after "", "v1"
        head = parts[0]
        if head == "models" and method == "GET":
            await send_json(send, 200, self._models(parts), extra)
            return
        if head in ("files", "batches"):
            if not self.config.batch_api:
                raise not_found(f"Invalid URL ({method} {path})")
            handler = self._files if head == "files" else self._batches
            status, obj = await handler(parts[1:], method, scope, receive)
            if isinstance(obj, bytes):
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/octet-stream"),
                                        (b"content-length", str(len(obj)).encode()), *extra]})
                await send({"type": "http.response.body", "body": obj, "more_body": False})
            else:
                await send_json(send, status, obj, extra)
            return
        raise not_found(f"Invalid URL ({method} {path})")

    def _models(self, parts: list[str]) -> dict[str, Any]:
        def model(mid: str) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": 1700000000, "owned_by": "simulator"}

        if len(parts) > 1:
            return model("/".join(parts[1:]))
        return {"object": "list", "data": [model(m) for m in self.config.models]}

    # --- chat -----------------------------------------------------------------------------------
    async def _chat(self, scope: Scope, receive: Receive, send: Send,
                    extra: list[tuple[bytes, bytes]]) -> None:
        body = await _json_body(receive)
        model = body.get("model")
        messages = body.get("messages")
        if not isinstance(model, str) or not model:
            raise invalid_request("you must provide a model parameter", "model",
                                  "missing_required_parameter")
        if not isinstance(messages, list) or not messages or \
                not all(isinstance(m, dict) for m in messages):
            raise invalid_request("'messages' must be a non-empty array of message objects.",
                                  "messages", "invalid_type" if messages else "empty_array")
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):
            raise invalid_request("max_tokens must be a positive integer.", "max_tokens",
                                  "integer_below_min_value")
        stream = bool(body.get("stream"))
        opts = body.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))

        ph = prompt_hash(messages)
        d = parse_messages(messages)
        stats = self.stats
        stats.incr("requests", ph)
        stats.keep_body(ph, body)
        _, prefill = split_prefill(messages)
        if prefill is not None:
            stats.incr("continuations", ph)
        tier = self._serving_tier(body, model, ph, d)
        with self._flex_slot(tier):
            await self._answer(send, receive, extra, body, model, messages, limit, stream,
                               include_usage, ph, d, prefill, tier)

    def _serving_tier(self, body: dict[str, Any], model: str, ph: str, d: Directives) -> str:
        """The tier that serves a call (``service_tier`` checked, faults and flex refusals
        injected as configured), counted in the stats."""
        asked = body.get("service_tier")
        if asked is not None and asked not in ("auto", "default", "flex", "priority"):
            raise invalid_request(f"Invalid value for 'service_tier': {str(asked)[:40]!r}.",
                                  "service_tier", "invalid_value")
        err = self.faults.request_error(ph, d)
        if err is None and asked == "flex":
            err = self.faults.flex_error(ph, d, model, self.flex_in_flight)
        if err is not None:
            self.stats.incr("errors_injected", ph)
            if asked == "flex" and err.status in (400, 429):
                self.stats.incr(f"flex_refused_{err.status}", ph)
            raise err
        tier = d.tier or (asked if asked in ("flex", "priority") else "default")
        self.stats.incr(f"served_{tier}", ph)
        return tier

    @contextlib.contextmanager
    def _flex_slot(self, tier: str) -> Iterator[None]:
        """Count a flex call in flight while it is served (for the concurrency limit)."""
        if tier != "flex":
            yield
            return
        self.flex_in_flight += 1
        try:
            yield
        finally:
            self.flex_in_flight -= 1

    def _tier_timing(self, tier: str, ttft: float, tps: float) -> tuple[float, float]:
        """Time to first token and tokens per second as the tier serves them."""
        if tier == "flex":
            return (max(ttft * self.config.flex_slowdown, self.config.flex_min_ttft_s),
                    tps / self.config.flex_slowdown)
        if tier == "priority":
            return ttft / self.config.priority_speedup, tps * self.config.priority_speedup
        return ttft, tps

    async def _answer(self, send: Send, receive: Receive, extra: list[tuple[bytes, bytes]],
                      body: dict[str, Any], model: str, messages: list[Any], limit: int | None,
                      stream: bool, include_usage: bool, ph: str, d: Directives,
                      prefill: str | None, tier: str) -> None:
        stats = self.stats
        answer = tool_call_answer(body, model, self.config.seed, d) or make_answer(
            messages, model, seed=self.config.seed, length=d.tokens, limit=limit,
            min_tokens=self.config.min_tokens, max_tokens=self.config.max_tokens)
        ttft = d.ttft if d.ttft is not None else self.config.ttft_s
        tps = d.tps if d.tps is not None else self.config.tokens_per_s
        ttft, tps = self._tier_timing(tier, ttft, tps)
        # What the tier made of the timing (a header, so tests read it instead of timing it).
        extra = [*extra, (b"x-sim-ttft-s", f"{ttft:.6f}".encode())]
        cid = completion_id()
        created = int(time.time())
        if not stream:
            delay = ttft + (answer.completion_tokens / tps if tps > 0 else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
            stats.incr("completions", ph)
            if prefill is not None:
                stats.incr("continuations_completed", ph)
            await send_json(send, 200, completion_body(answer, model, cid, created, tier), extra)
            return
        drop_after = self.faults.drop_after(ph, d, is_continuation=prefill is not None)
        stats.incr("streams_started", ph)
        outcome = await stream_answer(
            send, receive, answer=answer,
            encoder=ChunkEncoder(model, cid, created, include_usage, tier),
            ttft=ttft, tps=tps, drop_after=drop_after, headers=extra,
        )
        stats.incr("streams_" + outcome, ph)
        if outcome == "completed" and prefill is not None:
            stats.incr("continuations_completed", ph)

    # --- responses and embeddings ------------------------------------------------------------------
    async def _responses(self, receive: Receive, send: Send,
                         extra: list[tuple[bytes, bytes]]) -> None:
        body = await _json_body(receive)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise invalid_request("you must provide a model parameter", "model",
                                  "missing_required_parameter")
        messages = input_messages(body)
        limit = output_limit(body)
        ph = prompt_hash(messages)
        d = parse_messages(messages)
        stats = self.stats
        stats.incr("requests", ph)
        stats.keep_body(ph, body)
        tier = self._serving_tier(body, model, ph, d)
        with self._flex_slot(tier):
            await self._respond(send, receive, extra, body, model, messages, limit, ph, d, tier)

    async def _respond(self, send: Send, receive: Receive, extra: list[tuple[bytes, bytes]],
                       body: dict[str, Any], model: str, messages: list[Any], limit: int | None,
                       ph: str, d: Directives, tier: str) -> None:
        stats = self.stats
        stream = bool(body.get("stream"))
        answer = answer_for_response(body, model, messages, limit, d, self.config)
        if d.response_failed is not None:
            answer = replace(answer, tokens=answer.tokens[:d.response_failed])
        ttft = d.ttft if d.ttft is not None else self.config.ttft_s
        tps = d.tps if d.tps is not None else self.config.tokens_per_s
        ttft, tps = self._tier_timing(tier, ttft, tps)
        builder = ResponseBuilder(body, model, answer, int(time.time()))
        builder.failed = d.response_failed is not None
        builder.service_tier = tier
        if not stream:
            delay = ttft + (answer.completion_tokens / tps if tps > 0 else 0.0)
            if delay > 0:
                await asyncio.sleep(delay)
            stats.incr("completions", ph)
            await send_json(send, 200, builder.response(True), extra)
            return
        drop_after = self.faults.drop_after(ph, d, is_continuation=False)
        stats.incr("streams_started", ph)
        outcome = await stream_answer(
            send, receive, answer=answer, encoder=ResponsesEncoder(builder),
            ttft=ttft, tps=tps, drop_after=drop_after, headers=extra,
        )
        stats.incr("streams_" + outcome, ph)

    async def _embeddings(self, receive: Receive, send: Send,
                          extra: list[tuple[bytes, bytes]]) -> None:
        body = await _json_body(receive)
        req = parse_request(body, self.config.embedding_dimensions)
        messages = prompt_messages(req)
        ph = prompt_hash(messages)
        d = embedding_directives(req)
        self.stats.incr("requests", ph)
        self.stats.keep_body(ph, body)
        err = self.faults.request_error(ph, d)
        if err is not None:
            self.stats.incr("errors_injected", ph)
            raise err
        ttft = d.ttft if d.ttft is not None else self.config.ttft_s
        if ttft > 0:
            await asyncio.sleep(ttft)
        self.stats.incr("completions", ph)
        await send_json(send, 200, embeddings_body(req, self.config.seed), extra)

    # --- files ----------------------------------------------------------------------------------
    async def _files(self, parts: list[str], method: str, scope: Scope,
                     receive: Receive) -> tuple[int, Any]:
        files = self.files
        if not parts:
            if method == "POST":
                return 200, await self._upload(scope, receive)
            if method == "GET":
                q = query(scope)
                return 200, files.list(q.get("purpose"), _int_param(q, "limit", 10000, 1, 10000),
                                       q.get("after"), q.get("order", "desc"))
        elif len(parts) == 1:
            if method == "GET":
                return 200, files.get(parts[0]).to_dict()
            if method == "DELETE":
                return 200, files.delete(parts[0])
        elif len(parts) == 2 and parts[1] == "content" and method == "GET":
            return 200, files.get(parts[0]).data
        raise not_found(f"Invalid URL ({method} /v1/files/{'/'.join(parts)})")

    async def _upload(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        request = Request(scope, receive)
        try:
            form = await request.form(max_part_size=1024 * 1024 * 1024)
        except Exception as exc:  # starlette raises a few different parse errors
            raise invalid_request(f"Could not parse multipart form: {exc}") from None
        try:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise invalid_request("Missing required parameter: 'file'.", "file",
                                      "missing_required_parameter")
            if not isinstance(purpose, str) or not purpose:
                raise invalid_request("Missing required parameter: 'purpose'.", "purpose",
                                      "missing_required_parameter")
            if purpose not in ("batch", "fine-tune", "assistants", "user_data", "vision",
                               "evals"):
                raise invalid_request(f"Invalid purpose {purpose!r}.", "purpose")
            data = await upload.read()
            f = self.files.create(upload.filename or "upload.jsonl", purpose, data)
        finally:
            await form.close()
        self.stats.incr("files_created")
        return f.to_dict()

    # --- batches --------------------------------------------------------------------------------
    async def _batches(self, parts: list[str], method: str, scope: Scope,
                       receive: Receive) -> tuple[int, Any]:
        store = self.batches
        if not parts:
            if method == "POST":
                raw = await read_body(receive)
                try:
                    params = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise invalid_request("We could not parse the JSON body of your "
                                          "request.") from None
                if not isinstance(params, dict):
                    raise invalid_request("The request body must be a JSON object.")
                rec = store.create(params)
                self.stats.incr("batches_created")
                self.stats.incr("batch_lines", by=len(rec.lines))
                return 200, rec.to_dict()
            if method == "GET":
                q = query(scope)
                return 200, store.list(_int_param(q, "limit", 20, 1, 100), q.get("after"))
        elif len(parts) == 1 and method == "GET":
            return 200, store.get(parts[0]).to_dict()
        elif len(parts) == 2 and parts[1] == "cancel" and method == "POST":
            return 200, store.cancel(parts[0]).to_dict()
        raise not_found(f"Invalid URL ({method} /v1/batches/{'/'.join(parts)})")

    # --- simulator control ------------------------------------------------------------------------
    async def _sim(self, path: str, method: str, scope: Scope, receive: Receive,
                   send: Send) -> None:
        if path == "/healthz":
            await send_json(send, 200, {"status": "ok"})
            return
        if path == "/sim/stats" and method == "GET":
            q = query(scope)
            ph = q.get("prompt_hash")
            if ph is not None:
                await send_json(send, 200, self.stats.for_prompt(ph))
                return
            snap = self.stats.snapshot()
            snap["files"] = len(self.files.files)
            snap["batches"] = len(self.batches.batches)
            snap["flex_in_flight"] = self.flex_in_flight
            await send_json(send, 200, snap)
            return
        if path == "/sim/last_request" and method == "GET":
            ph = query(scope).get("prompt_hash", "")
            body = self.stats.last_bodies.get(ph)
            if body is None:
                raise not_found(f"no chat request with prompt_hash {ph!r}")
            await send_json(send, 200, body)
            return
        if path == "/sim/reset" and method == "POST":
            await read_body(receive)
            self.stats.reset()
            self.faults.reset()
            await send_json(send, 200, {"reset": True})
            return
        if path == "/sim/config" and method == "GET":
            await send_json(send, 200, self.config.model_dump())
            return
        raise not_found(f"Invalid URL ({method} {path})")


def create_app(config: SimConfig | None = None) -> SimulatorApp:
    """Build the ASGI app (``uvicorn 'hybrid_router.simulator.app:create_app' --factory`` works too)."""
    return SimulatorApp(config or SimConfig())
