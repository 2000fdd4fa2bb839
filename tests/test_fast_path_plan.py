"""A fast route runs what the route declares: its parameters, ``Depends`` and route-level
``dependencies`` (in FastAPI's order, each cached dependency once), so a dependency added to the
route later runs on the fast path too; what the plan cannot solve fails at startup.

(No ``from __future__ import annotations`` here: FastAPI reads these local functions'
annotations at runtime.)"""

from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel

from hybrid_router.router.api.fast_path import FastPathRoute, FastPaths, with_fast_path


class Item(BaseModel):
    name: str


def calls_of(request: Request) -> list[str]:
    calls: list[str] = request.app.state.calls
    return calls


async def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    calls_of(request).append("caller")
    if authorization != "Bearer good":
        raise HTTPException(401, "bad key")
    return "tenant-a"


async def endpoint(shelf: str, item: Item, request: Request,
                   who: Annotated[str, Depends(caller)],
                   note: Annotated[str | None, Header(alias="X-Note")] = None,
                   limit: Annotated[int, Query()] = 5) -> Response:
    path = "fast" if "route" not in request.scope else "general"  # FastAPI's routing sets it
    calls_of(request).append(path)
    return Response(f"{path} {shelf} {item.name} {who} {note} {limit}")


def client_with(dependencies: list[Any]) -> tuple[TestClient, list[str]]:
    """An app with one fast route, POST /items/{shelf}, with route-level `dependencies`; the
    list the dependencies and the endpoint record their calls in."""
    app = FastAPI()
    app.state.calls = []
    app.router.add_api_route("/items/{shelf}", endpoint, methods=["POST"],
                             dependencies=dependencies, route_class_override=FastPathRoute)
    app.add_middleware(FastPaths, routes=app.router.routes)
    return TestClient(app), app.state.calls


GOOD = {"Authorization": "Bearer good", "X-Note": "n"}


def audit(request: Request, who: Annotated[str, Depends(caller)]) -> None:
    calls_of(request).append(f"audit {who}")  # a plain def: run in the thread pool


async def refuse_b(request: Request, item: Item) -> None:
    calls_of(request).append("refuse_b")
    if item.name == "b":
        raise HTTPException(403, "no b")


def test_a_dependency_added_to_a_route_runs_on_the_fast_path() -> None:
    plain, calls = client_with([])
    assert plain.post("/items/s1", json={"name": "a"}, headers=GOOD).text == \
        "fast s1 a tenant-a n 5"
    assert calls == ["caller", "fast"]

    audited, calls = client_with([Depends(audit), Depends(refuse_b)])
    assert audited.post("/items/s1", json={"name": "a"}, headers=GOOD).text.startswith("fast ")
    # FastAPI's order; `caller` (cached) once although both `audit` and the endpoint take it.
    assert calls == ["caller", "audit tenant-a", "refuse_b", "fast"]
    calls.clear()
    refused = audited.post("/items/s1", json={"name": "b"}, headers=GOOD)
    assert (refused.status_code, refused.json()) == (403, {"detail": "no b"})
    assert calls == ["caller", "audit tenant-a", "refuse_b"]
    # FastAPI's general path (a content type the fast path leaves to it) does the same.
    calls.clear()
    general = audited.post("/items/s1", content=b'{"name": "b"}',
                           headers={**GOOD, "Content-Type": "application/json; charset=utf-8"})
    assert (general.status_code, general.json()) == (403, {"detail": "no b"})
    assert calls == ["caller", "audit tenant-a", "refuse_b"]


def test_errors_of_dependencies_are_answered_as_by_fastapi() -> None:
    client, calls = client_with([])
    unauthorised = client.post("/items/s1", json={"name": "a"})
    assert (unauthorised.status_code, unauthorised.json()) == (401, {"detail": "bad key"})
    assert calls == ["caller"]


def test_what_needs_checking_goes_to_fastapi() -> None:
    client, calls = client_with([])
    # A parameter that needs converting (an int query) is FastAPI's: it converts or refuses it.
    assert client.post("/items/s1?limit=7", json={"name": "a"}, headers=GOOD).text == \
        "general s1 a tenant-a n 7"
    bad = client.post("/items/s1?limit=x", json={"name": "a"}, headers=GOOD)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "limit"]
    missing = client.post("/items/s1", json={"nom": "a"}, headers=GOOD)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "name"]
    assert "fast" not in calls


def test_what_the_plan_cannot_solve_fails_at_startup() -> None:
    def session() -> Iterator[str]:
        yield "s"

    client, _calls = client_with([Depends(session)])
    with pytest.raises(ValueError, match="a generator"):
        client.post("/items/s1", json={"name": "a"})

    async def fast(_request: Request) -> Response | None:
        return None

    async def guard() -> None:
        return None

    app = FastAPI()
    app.router.add_api_route("/x", endpoint, methods=["POST"], dependencies=[Depends(guard)],
                             route_class_override=with_fast_path(fast))
    app.add_middleware(FastPaths, routes=app.router.routes)
    with pytest.raises(ValueError, match="would skip the route's dependencies"):
        TestClient(app).post("/x", json={"name": "a"})
