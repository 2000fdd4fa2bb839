"""The fast path of a route takes only plain, valid JSON requests and hands everything else to
FastAPI's general handler, which then answers exactly as without a fast path; its errors are
answered by the app's own exception handlers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from hybrid_router.router.api.fast_path import FastPaths, json_model, with_fast_path
from hybrid_router.router.core.schemas import SubmitRequest
from hybrid_router.settings import Settings

VALID = b'{"messages": [{"role": "user", "content": "hi"}], "priority": "low"}'


def request(body: bytes, content_type: str | None = "application/json") -> Request:
    headers = [(b"content-type", content_type.encode())] if content_type is not None else []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def parsed(body: bytes, content_type: str | None = "application/json") -> SubmitRequest | None:
    return asyncio.run(json_model(request(body, content_type), SubmitRequest))


def test_plain_valid_json_is_parsed() -> None:
    model = parsed(VALID)
    assert model is not None and model.priority == "low" and model.messages[0].content == "hi"


def test_everything_unusual_is_left_to_the_general_handler() -> None:
    assert parsed(VALID, "application/json; charset=utf-8") is None
    assert parsed(VALID, "text/plain") is None
    assert parsed(VALID, None) is None
    assert parsed(b"") is None
    assert parsed(b'{"messages": [') is None  # malformed
    assert parsed(b"[1, 2]") is None  # not an object
    assert parsed(b'{"messages": [{"role": "user", "content": NaN}]}') is None  # not finite
    assert parsed(b'{"messages": [{"role": "user", "content": "\\ud800"}]}') is None
    assert parsed(b"[" * 100_000 + b"]" * 100_000) is None  # too deep for the parser


class Item(BaseModel):
    name: str


class Refused(Exception):
    """An error the app has its own handler for."""


def app_with_fast_paths() -> FastAPI:
    async def fast(req: Request) -> Response | None:
        item = await json_model(req, Item)
        if item is None or item.name == "general":
            return None
        if item.name == "refused":
            raise Refused("no")
        if item.name == "broken":
            raise RuntimeError("a bug")
        return Response(f"fast {item.name}")

    async def fast_get(req: Request) -> Response | None:
        number = req.path_params["number"]
        return None if number == 0 else Response(f"fast {number} {type(number).__name__}")

    app = FastAPI()

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> Response:
        return Response(f"refused: {exc}", status_code=409)

    async def endpoint(item: Item) -> Response:
        return Response(f"general {item.name}")

    async def get_endpoint(number: int) -> Response:
        return Response(f"general {number}")

    app.router.add_api_route("/items", endpoint, methods=["POST"],
                             route_class_override=with_fast_path(fast))
    app.router.add_api_route("/items/{number:int}", get_endpoint, methods=["GET"],
                             route_class_override=with_fast_path(fast_get))
    app.add_middleware(FastPaths, routes=app.router.routes)
    return app


def test_the_route_answers_from_the_fast_path_or_else_the_general_one() -> None:
    client = TestClient(app_with_fast_paths(), raise_server_exceptions=False)
    assert client.post("/items", json={"name": "a"}).text == "fast a"
    # Declined after reading the body: the general handler still gets the whole body.
    assert client.post("/items", json={"name": "general"}).text == "general general"
    refused = client.post("/items", json={"nom": "a"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "name"]
    assert client.get("/items/7").text == "fast 7 int"  # path parameters, converted
    assert client.get("/items/0").text == "general 0"
    assert client.get("/items/x").status_code == 404  # no route matches: FastAPI's answer
    assert client.put("/items", json={"name": "a"}).status_code == 405
    assert "/items" in client.get("/openapi.json").json()["paths"]


def test_an_error_on_the_fast_path_is_answered_by_the_apps_handlers() -> None:
    client = TestClient(app_with_fast_paths(), raise_server_exceptions=False)
    answer = client.post("/items", json={"name": "refused"})
    assert (answer.status_code, answer.text) == (409, "refused: no")
    assert client.post("/items", json={"name": "broken"}).status_code == 500
    with pytest.raises(RuntimeError, match="a bug"):  # and not swallowed on the way
        TestClient(app_with_fast_paths()).post("/items", json={"name": "broken"})


def test_urls_never_come_from_the_host_header() -> None:
    """Issue 16: URLs come from ROUTER_PUBLIC_BASE_URL, or are relative to the app's root
    path; the client's Host header (``evil.example``) never reaches them."""
    from types import SimpleNamespace

    from hybrid_router.router.api.routes.requests import urls_for

    def req(public: str | None, host: bytes, root_path: str = "") -> Request:
        app = SimpleNamespace(state=SimpleNamespace(settings=Settings(public_base_url=public)))
        return Request({"type": "http", "method": "POST", "path": "/v1/requests",
                        "headers": [(b"host", host)], "scheme": "http", "app": app,
                        "server": ("10.0.0.1", 8000), "root_path": root_path, "query_string": b""})

    rid = "0" * 32
    assert urls_for(req(None, b"evil.example"), rid) == (
        f"/v1/requests/{rid}/events", f"/v1/requests/{rid}")
    assert urls_for(req(None, b"evil.example", "/router"), rid)[1] == f"/router/v1/requests/{rid}"
    assert urls_for(req("https://api.example.com/", b"evil.example"), rid) == (
        f"https://api.example.com/v1/requests/{rid}/events",
        f"https://api.example.com/v1/requests/{rid}")
