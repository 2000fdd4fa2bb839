"""The ``config`` CLI verbs: read and change runtime settings without restarting anything.

    hybrid-router config get
    hybrid-router config set flush-interval SECONDS

They write the same Redis hash as ``PUT /v1/admin/config``; beat applies a new flush interval
at its next tick (about a second).
"""

from __future__ import annotations

import json
from typing import Annotated

import redis
import typer

from router.runtime_config import get_flush_interval, runtime_view, set_flush_interval

config_app = typer.Typer(help="Read or change runtime settings (flush interval).",
                         no_args_is_help=True)

SETTABLE = ("flush-interval",)


@config_app.command("get")
def get_config() -> None:
    """Show the runtime configuration as JSON."""
    from router.cli import load_settings

    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        view = runtime_view(get_flush_interval(client, settings), settings)
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: cannot reach Redis: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(view))


@config_app.command("set")
def set_config(
    name: Annotated[str, typer.Argument(help="What to set: flush-interval.")],
    value: Annotated[str, typer.Argument(help="New value (seconds for flush-interval).")],
) -> None:
    """Change a runtime setting, e.g. ``config set flush-interval 30``."""
    from router.cli import load_settings

    if name not in SETTABLE:
        typer.echo(f"hybrid-router: unknown setting {name!r}; settable: {', '.join(SETTABLE)}",
                   err=True)
        raise typer.Exit(2)
    try:
        seconds = float(value)
    except ValueError as exc:
        typer.echo(f"hybrid-router: flush-interval must be a number of seconds, got {value!r}",
                   err=True)
        raise typer.Exit(2) from exc
    settings = load_settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        applied = set_flush_interval(client, settings, seconds)
    except ValueError as exc:
        typer.echo(f"hybrid-router: {exc}", err=True)
        raise typer.Exit(2) from exc
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: cannot reach Redis: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"flush_interval_s": applied}))


def register(app: typer.Typer) -> None:
    """Add the ``config`` verb group to the main CLI."""
    app.add_typer(config_app, name="config")
