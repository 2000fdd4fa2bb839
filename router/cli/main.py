"""The ``hybrid-router`` command line: serve the API, run workers and beat, operate.

Each serving verb takes ``--host``/``--port``; everything else comes from `Settings`
(``ROUTER_*`` env or ``.env``). Verbs are registered by the module that owns them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from hybrid_router.router.core.logs import configure_logging
from hybrid_router.settings import Settings, get_settings
from hybrid_router.settings.config import describe_settings_error

app = typer.Typer(
    name="hybrid-router",
    help="Route LLM requests: high priority streams at once, low priority is batched at half price.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: readable at 80 columns (rich's boxed table cut option names and showed
    # `<bool>` for flags), no markup to leak as literal backquotes or brackets.
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)


def load_settings() -> Settings:
    """Settings for a CLI verb; a bad setting is one clear line and exit code 2."""
    try:
        settings = get_settings()
    except Exception as exc:
        typer.echo(f"hybrid-router: invalid configuration: {describe_settings_error(exc)}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings)
    return settings


@app.command(short_help="Run the intake HTTP API.")
def api(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the intake HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    settings = load_settings()
    host = host or settings.api_host
    port = port if port is not None else settings.api_port
    from hybrid_router.router.api import http_guards

    if workers > 1:  # each worker process configures the protocol in hybrid_router.router.api.asgi
        uvicorn.run("hybrid_router.router.api.asgi:app", host=host, port=port, workers=workers,
                    log_level="warning", access_log=False, factory=False,
                    http=http_guards.PROTOCOL)
        return
    from hybrid_router.router.api.app import create_app

    http_guards.configure(settings)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False,
                http=http_guards.PROTOCOL)


@app.command(short_help="Run a Celery worker for one lane (stream or batch).")
def worker(
    lane: Annotated[str, typer.Option(help="Which lane: stream or batch.")] = "stream",
    concurrency: Annotated[int | None, typer.Option(
        help="Stream lane: most streams at once; batch lane: threads (default from settings).")] = None,
    name: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    host: Annotated[str | None, typer.Option(hidden=True)] = None,
    port: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run a Celery worker for one lane: for the stream lane, its stream engine runs every
    stream on one event loop; the batch lane uses Celery's threads pool (I/O-bound tasks)."""
    from hybrid_router.router.core.keys import Keys
    from hybrid_router.workers.celery_app import create_celery

    settings = load_settings()
    keys = Keys(settings.key_prefix)
    if lane not in ("stream", "batch"):
        typer.echo("hybrid-router: --lane must be 'stream' or 'batch'", err=True)
        raise typer.Exit(2)
    if lane == "stream":
        if concurrency:
            settings = settings.model_copy(update={"stream_worker_concurrency": concurrency})
        # The stream engine's bootstep takes the stream queue (hybrid_router.workers.stream.bootstep) and
        # leaves Celery's own consumer the control queue (other tasks): a few threads.
        queue, threads = keys.stream_queue(), 4
    else:
        queue, threads = keys.batch_queue(), concurrency or settings.emulated_concurrency + 4
    celery_app = create_celery(settings)
    argv = [
        "worker",
        "-Q", queue,
        "-P", "threads",
        "-c", str(threads),
        "-n", name or f"{lane}@%h",
        "--without-gossip",
        "--without-mingle",
        "-E",
        "--loglevel", settings.log_level,
    ]
    celery_app.worker_main(argv=argv)


@app.command(short_help="Run Celery beat: batch flush and poll (one per deployment).")
def beat(
    schedule: Annotated[str | None, typer.Option(help="Beat schedule file.")] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Do not run beat: exit 0 if the beat of this host ticked within "
        "--max-age seconds, else 1 (a liveness check).")] = False,
    max_age: Annotated[float, typer.Option(help="With --check: oldest acceptable tick, seconds.")
                       ] = 30.0,
) -> None:
    """Run Celery beat (exactly one per deployment): the batch flush and poll."""
    import tempfile

    from hybrid_router.workers.celery_app import create_celery

    settings = load_settings()
    if check:
        raise typer.Exit(_beat_check(settings, max_age))
    celery_app = create_celery(settings)
    path = schedule or f"{tempfile.gettempdir()}/hybrid-router-beat-{settings.key_prefix}"
    celery_app.start(argv=["beat", "--schedule", path, "--loglevel", settings.log_level])


def _beat_check(settings: Settings, max_age_s: float) -> int:
    """Liveness of the beat on this host: the age of its last tick in Redis (`Keys.beat()`)."""
    import socket

    import redis

    from hybrid_router.router.core.keys import Keys
    from hybrid_router.router.core.redis_io import sync_client
    from hybrid_router.router.core.runtime_config import BeatReport

    client = sync_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        report = BeatReport.from_hash(client.hgetall(Keys(settings.key_prefix).beat()))
    except redis.RedisError as exc:
        typer.echo(f"hybrid-router: beat unknown: cannot read Redis: {exc}", err=True)
        return 1
    finally:
        client.close()
    age = report.age_s() if report is not None else None
    if report is None or age is None:
        typer.echo("hybrid-router: no beat has ticked (no report in Redis)", err=True)
        return 1
    here = socket.gethostname()
    if report.host != here:
        typer.echo(f"hybrid-router: the last beat tick came from {report.host}, not {here}",
                   err=True)
        return 1
    if age > max_age_s:
        typer.echo(f"hybrid-router: beat's last tick was {age:.1f}s ago (> {max_age_s:g}s)",
                   err=True)
        return 1
    typer.echo(f"beat alive: pid {report.pid} ticked {age:.1f}s ago")
    return 0


def _register_optional_verbs() -> None:
    """Verbs owned by other modules register themselves here."""
    import importlib

    for module_name in ("hybrid_router.simulator.cli", "hybrid_router.router.cli.ops",
                        "hybrid_router.router.cli.config"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_optional_verbs()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
