"""Python client of the router, for web apps (Django, Flask, FastAPI...).

Over HTTP: `RouterClient` (sync) and `AsyncRouterClient` (async) submit a request and return a
handle (like arq's ``Job``) with ``status()``, ``stream()``, ``tokens()``, ``result(timeout)``
and ``cancel()``. The client is written once, as `AsyncRouterClient`; `RouterClient` runs that
code over httpx's blocking client (`hybrid_router.router.core.blocking`). Without HTTP:
`enqueue(settings, ...)` writes straight into the shared Redis (and the Celery stream queue)
through the same intake code the API runs.

Waiting for a result follows the request's Server-Sent Events and only falls back to polling
``GET /v1/requests/{id}`` (with growing pauses, never a busy loop) when the events endpoint is
not there. Every 4xx/5xx answer raises `RouterError` carrying the server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from hybrid_router.router.core.blocking import iterate_blocking, run_blocking
from hybrid_router.router.core.events import FINAL_EVENT_TYPES
from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.router.core.states import TERMINAL

if TYPE_CHECKING:
    from hybrid_router.settings import Settings

__all__ = [
    "AsyncRequestHandle",
    "AsyncRouterClient",
    "RequestHandle",
    "RouterClient",
    "RouterError",
    "enqueue",
]

POLL_FIRST_S = 0.1
POLL_MAX_S = 2.0
POLL_GROWTH = 1.6
RECONNECT_MAX_S = 5.0
# Server keep-alives come every 15 s; three missed ones mean the connection is dead.
SSE_READ_TIMEOUT_S = 45.0
# Status codes of the events endpoint that mean "this server has no SSE": poll instead.
_NO_SSE = frozenset({404, 405, 501})


class RouterError(Exception):
    """An error answer of the router (or a request refused by the direct `enqueue`)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def _error_from(response: httpx.Response) -> RouterError:
    try:
        detail = response.json().get("error") or {}
    except (ValueError, AttributeError):
        detail = {}
    message = detail.get("message") if isinstance(detail, dict) else None
    return RouterError(
        response.status_code,
        message or response.text[:500] or response.reason_phrase,
        detail.get("param") if isinstance(detail, dict) else None,
        detail.get("code") if isinstance(detail, dict) else None,
    )


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _error_from(response)
    data: dict[str, Any] = response.json()
    return data


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _submit_body(messages: list[dict[str, Any]] | None, model: str | None, priority: str,
                 fields: dict[str, Any]) -> dict[str, Any]:
    """The body of POST /v1/requests; `messages` None for a body of another endpoint
    (``endpoint="/v1/embeddings", input=[...]``)."""
    body: dict[str, Any] = {"priority": priority, **fields}
    if messages is not None:
        body["messages"] = messages
    if model is not None:
        body["model"] = model
    return body


# --- Server-Sent Events -------------------------------------------------------------------------


@dataclass
class SSEDecoder:
    """Turns SSE lines into event dicts (the JSON of each ``data:``); comments are skipped."""

    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            if not self._data:
                return None
            text = "\n".join(self._data)
            self._data.clear()
            value = orjson.loads(text)
            return value if isinstance(value, dict) else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


class _Backoff:
    """Growing pauses between polls or reconnects, capped, never shorter than `first`."""

    def __init__(self, first: float, cap: float) -> None:
        self.next = first
        self.cap = cap

    def pause(self) -> float:
        current = self.next
        self.next = min(self.cap, self.next * POLL_GROWTH)
        return current


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def left(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def cap(self, seconds: float) -> float:
        left = self.left()
        return seconds if left is None else min(seconds, left)


def _timeout_error(request_id: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"request {request_id} did not finish within {timeout}s")


class _NoSSE(Exception):
    """The server has no events endpoint: wait by polling instead."""


# --- one client, two kinds of I/O ----------------------------------------------------------------


class _AsyncIO:
    """What the client does on the network and the clock, over asyncio."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def request(self, method: str, url: str, body: Any = None) -> httpx.Response:
        return await self.http.request(method, url, json=body)

    def stream(self, url: str, headers: dict[str, str], timeout: httpx.Timeout
               ) -> AbstractAsyncContextManager[httpx.Response]:
        return self.http.stream("GET", url, headers=headers, timeout=timeout)

    async def read(self, response: httpx.Response) -> None:
        await response.aread()

    def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        return response.aiter_lines()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        await self.http.aclose()


class _BlockingIO:
    """The same over blocking calls: its awaits never suspend (`run_blocking`)."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    async def request(self, method: str, url: str, body: Any = None) -> httpx.Response:
        return self.http.request(method, url, json=body)

    @contextlib.asynccontextmanager
    async def stream(self, url: str, headers: dict[str, str], timeout: httpx.Timeout
                     ) -> AsyncIterator[httpx.Response]:
        with self.http.stream("GET", url, headers=headers, timeout=timeout) as response:
            yield response

    async def read(self, response: httpx.Response) -> None:
        response.read()

    async def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        for line in response.iter_lines():
            yield line

    async def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    async def close(self) -> None:
        self.http.close()


class AsyncRouterClient:
    """Asynchronous HTTP client of the intake API. `RouterClient` is this same code run over
    blocking I/O."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30,
                 *, _io: _AsyncIO | _BlockingIO | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.io = _io or _AsyncIO(httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout))
        self._sse_available = True

    @property
    def http(self) -> httpx.AsyncClient | httpx.Client:
        return self.io.http

    async def __aenter__(self) -> AsyncRouterClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.io.close()

    async def submit(self, messages: list[dict[str, Any]] | None, *, model: str | None = None,
                     priority: str = "normal", **fields: Any) -> AsyncRequestHandle:
        """POST /v1/requests (see `RouterClient.submit`)."""
        data = _check(await self.io.request(
            "POST", "/v1/requests", _submit_body(messages, model, priority, fields)))
        return AsyncRequestHandle(self, data["id"], data.get("route"), data)

    async def get(self, request_id: str) -> dict[str, Any]:
        return _check(await self.io.request("GET", f"/v1/requests/{request_id}"))

    def handle(self, request_id: str) -> AsyncRequestHandle:
        return AsyncRequestHandle(self, request_id)

    async def cancel(self, request_id: str) -> dict[str, Any]:
        return _check(await self.io.request("DELETE", f"/v1/requests/{request_id}"))

    async def events(self, request_id: str, after_seq: int = 0,
                     deadline: _Deadline | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events after `after_seq`, reconnecting with Last-Event-ID until a final event."""
        deadline = deadline or _Deadline(None)
        last = after_seq
        backoff = _Backoff(0.1, RECONNECT_MAX_S)
        seen_terminal = False
        while True:
            timeout = httpx.Timeout(self.timeout, read=deadline.cap(SSE_READ_TIMEOUT_S))
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
            try:
                async with self.io.stream(f"/v1/requests/{request_id}/events", headers,
                                          timeout) as response:
                    await self._check_events_answer(response, last == after_seq)
                    decoder = SSEDecoder()
                    async for line in self.io.lines(response):
                        event = decoder.feed(line)
                        if event is None:
                            continue
                        last = max(last, int(event.get("seq", last)))
                        yield event
                        if event.get("type") in FINAL_EVENT_TYPES:
                            return
                        backoff = _Backoff(0.1, RECONNECT_MAX_S)
            except (httpx.TransportError, httpx.StreamError):
                pass  # reconnect below, resuming after `last`
            if deadline.passed():
                return
            # A terminal request's final event is in the replay log, so one more reconnect gets
            # it; a second try without it means the log expired: stop rather than loop forever.
            if (await self.get(request_id))["status"] in TERMINAL:
                if seen_terminal:
                    return
                seen_terminal = True
            await self.io.sleep(deadline.cap(backoff.pause()))

    async def _check_events_answer(self, response: httpx.Response, first: bool) -> None:
        """Raise for an error answer of the events endpoint (`_NoSSE` when it is not there)."""
        if response.status_code in _NO_SSE and first:
            await self.io.read(response)
            if response.status_code == 404 and _is_missing_request(response):
                raise _error_from(response)
            raise _NoSSE()
        if response.status_code >= 400:
            await self.io.read(response)
            raise _error_from(response)

    async def wait(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The record once terminal: follows the events, polls only when SSE is unavailable."""
        deadline = _Deadline(timeout)
        record = await self.get(request_id)
        if record["status"] in TERMINAL:
            return record
        if self._sse_available:
            try:
                async for event in self.events(request_id, 0, deadline):
                    if event.get("type") in FINAL_EVENT_TYPES:
                        break
            except _NoSSE:
                self._sse_available = False
            else:
                record = await self.get(request_id)
                if record["status"] in TERMINAL:
                    return record
        backoff = _Backoff(POLL_FIRST_S, POLL_MAX_S)
        while True:
            record = await self.get(request_id)
            if record["status"] in TERMINAL:
                return record
            if deadline.passed():
                raise _timeout_error(request_id, timeout)
            await self.io.sleep(deadline.cap(backoff.pause()))


def _is_missing_request(response: httpx.Response) -> bool:
    """404 from our route (no such request) rather than from a server without the route."""
    try:
        return (response.json().get("error") or {}).get("code") == "not_found"
    except (ValueError, AttributeError):
        return False


class AsyncRequestHandle:
    """One submitted request (like arq's ``Job``): its id and route, and ways to follow it."""

    def __init__(self, client: AsyncRouterClient, request_id: str, route: str | None = None,
                 submitted: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = request_id
        self._route = route
        self.submitted = submitted or {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, route={self._route!r})"

    @property
    def route(self) -> str | None:
        """The lane, known after `submit` (a handle made from an id learns it from `record()`)."""
        return self._route

    @property
    def idempotent_replay(self) -> bool:
        return bool(self.submitted.get("idempotent_replay"))

    async def record(self) -> dict[str, Any]:
        data = await self.client.get(self.id)
        self._route = data.get("route", self._route)
        return data

    async def status(self) -> str:
        return str((await self.record())["status"])

    def stream(self, after_seq: int = 0) -> AsyncIterator[dict[str, Any]]:
        return self.client.events(self.id, after_seq)

    async def tokens(self) -> AsyncIterator[str]:
        async for event in self.stream():
            if event.get("type") == "token":
                yield str(event.get("content", ""))
            elif event.get("type") == "error":
                raise RouterError(502, str(event.get("message")), code=event.get("code"))

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.client.wait(self.id, timeout)

    async def cancel(self) -> dict[str, Any]:
        return await self.client.cancel(self.id)


# --- sync: the async client run over blocking I/O -----------------------------------------------


class RouterClient:
    """Synchronous HTTP client of the intake API (`AsyncRouterClient` over blocking I/O)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key),
                                 timeout=timeout)
        self.core = AsyncRouterClient(base_url, api_key, timeout, _io=_BlockingIO(self.http))
        self.base_url = self.core.base_url
        self.timeout = timeout

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, messages: list[dict[str, Any]] | None, *, model: str | None = None,
               priority: str = "normal", **fields: Any) -> RequestHandle:
        """POST /v1/requests; `fields` are any other request or routing fields (`messages`
        None with ``endpoint="/v1/responses"`` or ``"/v1/embeddings"`` and ``input=``)."""
        return RequestHandle(self, run_blocking(
            self.core.submit(messages, model=model, priority=priority, **fields)))

    def get(self, request_id: str) -> dict[str, Any]:
        return run_blocking(self.core.get(request_id))

    def handle(self, request_id: str) -> RequestHandle:
        return RequestHandle(self, self.core.handle(request_id))

    def cancel(self, request_id: str) -> dict[str, Any]:
        return run_blocking(self.core.cancel(request_id))

    def events(self, request_id: str, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Events after `after_seq`, reconnecting with Last-Event-ID until a final event."""
        return iterate_blocking(self.core.events(request_id, after_seq))

    def wait(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The record once terminal: follows the events, polls only when SSE is unavailable."""
        return run_blocking(self.core.wait(request_id, timeout))


class RequestHandle:
    """One submitted request, sync flavour (an `AsyncRequestHandle` over blocking I/O)."""

    def __init__(self, client: RouterClient, core: AsyncRequestHandle) -> None:
        self.client = client
        self.core = core
        self.id = core.id
        self.submitted = core.submitted

    def __repr__(self) -> str:
        return f"RequestHandle(id={self.id!r}, route={self.core.route!r})"

    @property
    def route(self) -> str:
        """The lane (a handle made from an id reads it from the record)."""
        return self.core.route or str(self.record()["route"])

    @property
    def idempotent_replay(self) -> bool:
        return self.core.idempotent_replay

    def record(self) -> dict[str, Any]:
        return run_blocking(self.core.record())

    def status(self) -> str:
        return run_blocking(self.core.status())

    def stream(self, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        return iterate_blocking(self.core.stream(after_seq))

    def tokens(self) -> Iterator[str]:
        return iterate_blocking(self.core.tokens())

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        return run_blocking(self.core.result(timeout))

    def cancel(self) -> dict[str, Any]:
        return run_blocking(self.core.cancel())


# --- direct enqueue (no HTTP hop) ---------------------------------------------------------------


class DirectEnqueuer:
    """Accepts requests straight into the shared Redis, exactly as the API would."""

    def __init__(self, settings: Settings) -> None:
        from hybrid_router.router.core.celery_app import build_celery
        from hybrid_router.router.core.dispatch import CeleryStreamDispatcher
        from hybrid_router.router.core.lane_facts import LaneFactsCache
        from hybrid_router.router.core.store import RequestStore

        self.settings = settings
        self.redis = sync_client(settings.redis_url)
        self.store = RequestStore(self.redis, settings)
        self.dispatcher = CeleryStreamDispatcher(build_celery(settings))
        self.lane_facts = LaneFactsCache(settings)

    def enqueue(self, messages: list[dict[str, Any]] | None, *, model: str | None = None,
                priority: str = "low", tenant: str = "default", **fields: Any) -> str:
        from pydantic import ValidationError

        from hybrid_router.router.core.errors import InvalidRequest
        from hybrid_router.router.core.intake import accept_sync, prepare
        from hybrid_router.router.core.lanes import deadline_depends_on_flush
        from hybrid_router.router.core.runtime_config import get_flush_interval
        from hybrid_router.router.core.schemas import SubmitRequest

        try:
            req = SubmitRequest.model_validate(_submit_body(messages, model, priority, fields))
            flush_interval_s = (
                get_flush_interval(self.redis, self.settings)
                if deadline_depends_on_flush(req.priority, req.deadline_s, self.settings)
                else None
            )
            facts = self.lane_facts.get_sync(self.redis)
            accepted = accept_sync(prepare(req, tenant, self.settings, flush_interval_s,
                                           facts=facts), self.store, self.dispatcher)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise InvalidRequest(f"{param}: {first.get('msg')}", param) from exc
        return accepted.record.id

    def close(self) -> None:
        self.dispatcher.close()
        self.redis.close()


_enqueuers: dict[str, DirectEnqueuer] = {}
_enqueuers_lock = threading.Lock()


def enqueue(settings: Settings, messages: list[dict[str, Any]] | None, *,
            model: str | None = None,
            priority: str = "low", **fields: Any) -> str:
    """Accept a request without HTTP (same checks, route and storage as the API); its id.

    A refused request raises a `core.errors.RouterRefusal` subclass (`InvalidRequest`,
    `Conflict`, `Unavailable`...) with the `code`, `param` and message the API would send.

    The Redis connection and Celery producer are reused per settings. Pass ``tenant=`` to file
    the request under a tenant other than ``default`` (auth is the caller's business here).
    """
    cache_key = settings.model_dump_json()
    with _enqueuers_lock:
        enqueuer = _enqueuers.get(cache_key)
        if enqueuer is None:
            enqueuer = _enqueuers[cache_key] = DirectEnqueuer(settings)
    return enqueuer.enqueue(messages, model=model, priority=priority, **fields)
