"""ASGI entry point for multi-process servers: ``uvicorn hybrid_router.router.api.asgi:app``
(with ``--http hybrid_router.router.api.http_guards:GuardedHttpProtocol`` for the request-head deadline)."""

from hybrid_router.router.api import http_guards
from hybrid_router.router.api.app import create_app
from hybrid_router.settings import get_settings

http_guards.configure(get_settings())
app = create_app(get_settings())
