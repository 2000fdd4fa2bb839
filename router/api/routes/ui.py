"""``GET /ui``: the router's live page (static HTML, CSS and JS shipped in the package).

The files hold no data: the page asks ``GET /v1/stats`` (admin tenants when auth is on) with the
admin key the operator types in, kept in the tab's ``sessionStorage``, and changes the flush
interval with ``PUT /v1/admin/config``. Nothing is loaded from anywhere else.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from hybrid_router.router.core.errors import ErrorCode, NotFound

router = APIRouter(tags=["ui"])

_FILES = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
# A page with no inline script and nothing from other origins; it talks only to this API.
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def _read(name: str) -> bytes:
    return resources.files("hybrid_router.router.api").joinpath("ui", name).read_bytes()


@router.get("/ui", response_class=Response, include_in_schema=True,
            responses={200: {"content": {"text/html": {}}}})
async def ui_page() -> Response:
    """The live page: queues, batches in flight, flush, streams per worker, TTFT, today's cost."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/ui/{name}", response_class=Response, include_in_schema=False)
async def ui_asset(name: str) -> Response:
    media_type = _FILES.get(name)
    if media_type is None:
        raise NotFound(f"no UI file {name[:64]!r}", param="name", code=ErrorCode.NOT_FOUND)
    return Response(_read(name), media_type=media_type, headers=_HEADERS)
