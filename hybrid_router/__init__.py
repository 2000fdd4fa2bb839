"""hybrid-router: one import namespace for the project's folders.

`hybrid_router.settings`, `hybrid_router.router`, `hybrid_router.workers` and
`hybrid_router.simulator` are the repository's top-level folders `settings/`, `router/`,
`workers/` and `simulator/` (linked here), so an application's own ``settings.py``,
``router.py`` or ``workers.py`` never shadows a module of ours, nor ours one of theirs.

What an application usually needs is re-exported lazily here::

    from hybrid_router import enqueue, RouterClient
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncRouterClient", "RouterClient", "enqueue"]


def __getattr__(name: str) -> Any:
    """The client's public names, imported on first use (importing the namespace is free)."""
    if name in __all__:
        from hybrid_router.router.client import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
