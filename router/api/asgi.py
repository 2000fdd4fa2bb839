"""ASGI entry point for multi-process servers: ``uvicorn router.api.asgi:app``."""

from router.api.app import create_app
from settings import get_settings

app = create_app(get_settings())
