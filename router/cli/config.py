"""The ``config`` CLI verbs: read and change runtime settings without restarting anything.

    hybrid-router config get
    hybrid-router config set flush-interval SECONDS
    hybrid-router config reset flush-interval

They write the same Redis hash as ``PUT /v1/admin/config``; beat applies a new flush interval
at its next tick (about a second). The override stays in Redis across restarts until reset.
``get`` shows the running service's values as beat reports them in Redis (`Keys.beat()`), not
this command's own environment; with no beat reporting, it says so.
"""

from __future__ import annotations

import getpass
import json
import socket
from typing import Annotated

import redis
import typer

from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.router.core.runtime_config import (
    read_flush_interval,
    reset_flush_interval,
    runtime_view,
    set_flush_interval,
)

config_app = typer.Typer(help="Read or change runtime settings (flush interval).",
                         no_args_is_help=True, rich_markup_mode=None)

SETTABLE = ("flush-interval",)


def _who() -> str:
    """Who changed a setting, as the override records it."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        user = "unknown"
    return f"cli {user}@{socket.gethostname()}"


def _check_name(name: str) -> None:
    if name not in SETTABLE:
        typer.echo(f"hybrid-router: unknown setting {name!r}; settable: {', '.join(SETTABLE)}",
                   err=True)
        raise typer.Exit(2)


@config_app.command("get", short_help="Show the running service's intervals (beat's report).")
def get_config() -> None:
    """Show the running service's flush and poll intervals as JSON (as beat reports them in
    Redis), with where the flush interval comes from."""
    from hybrid_router.router.cli.main import load_settings

    settings = load_settings()
    client = sync_client(settings.redis_url, socket_timeout=5)
    try:
        view = runtime_view(*read_flush_interval(client, settings), settings)
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: cannot reach Redis: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(view))


@config_app.command("set", short_help="Override a setting at run time (kept until reset).")
def set_config(
    name: Annotated[str, typer.Argument(help="What to set: flush-interval.")],
    value: Annotated[str, typer.Argument(help="New value (seconds for flush-interval).")],
) -> None:
    """Override a setting at run time, e.g. 'config set flush-interval 30'. The override stays
    (across restarts) until 'config reset flush-interval'."""
    from hybrid_router.router.cli.main import load_settings

    _check_name(name)
    try:
        seconds = float(value)
    except ValueError as exc:
        typer.echo(f"hybrid-router: flush-interval must be a number of seconds, got {value!r}",
                   err=True)
        raise typer.Exit(2) from exc
    settings = load_settings()
    client = sync_client(settings.redis_url, socket_timeout=5)
    try:
        applied = set_flush_interval(client, settings, seconds, by=_who())
    except ValueError as exc:
        typer.echo(f"hybrid-router: {exc}", err=True)
        raise typer.Exit(2) from exc
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: cannot reach Redis: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"flush_interval_s": applied}))


@config_app.command("reset", short_help="Remove a run-time override.")
def reset_config(
    name: Annotated[str, typer.Argument(help="What to reset: flush-interval.")],
) -> None:
    """Remove a run-time override: beat goes back to ROUTER_FLUSH_INTERVAL_S at its next tick."""
    from hybrid_router.router.cli.main import load_settings

    _check_name(name)
    settings = load_settings()
    client = sync_client(settings.redis_url, socket_timeout=5)
    try:
        removed = reset_flush_interval(client, settings)
        interval, _beat = read_flush_interval(client, settings)
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: cannot reach Redis: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"reset": removed, "flush_interval_s": interval.seconds,
                           "flush_interval": interval.as_dict()}))


def register(app: typer.Typer) -> None:
    """Add the ``config`` verb group to the main CLI."""
    app.add_typer(config_app, name="config")
