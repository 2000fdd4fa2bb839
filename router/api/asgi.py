"""ASGI entry point for multi-process servers: ``uvicorn router.api.asgi:app``
(with ``--http router.api.slow_clients:GuardedHttpProtocol`` for the request-head deadline)."""

from router.api import slow_clients
from router.api.app import create_app
from settings import get_settings

slow_clients.configure(get_settings())
app = create_app(get_settings())
