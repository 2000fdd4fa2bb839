"""Operator verbs of the CLI: ``up``, ``flower``, ``submit``, ``tail`` and ``status``.

Every failure is one line on stderr (no traceback) and a meaningful exit code:
0 done / completed, 1 the request failed or was cancelled or a service is unreachable,
2 bad usage or a request the API refused (4xx).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from hybrid_router.router.core.redis_io import sync_client
from hybrid_router.settings import Settings

if TYPE_CHECKING:
    from hybrid_router.router.client import RequestHandle

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRIORITIES = ("high", "normal", "low")
SPINNER = "|/-\\"


def load_settings() -> Settings:
    """The CLI's settings loader (imported late: hybrid_router.router.cli.main imports this module)."""
    from hybrid_router.router.cli.main import load_settings as load

    return load()


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"hybrid-router: {message}", err=True)
    raise typer.Exit(code)


def default_api_url(settings: Settings) -> str:
    from hybrid_router.router.cli.up import local_host

    return f"http://{local_host(settings.api_host)}:{settings.api_port}"


def default_api_key(settings: Settings) -> str | None:
    """The first configured key, so an operator with the deployment's env needs no flag."""
    return next(iter(settings.api_keys), None)


@contextmanager
def client_errors(url: str) -> Iterator[None]:
    """Turn client and transport errors into one line and an exit code."""
    import httpx

    from hybrid_router.router.client import RouterError

    try:
        yield
    except RouterError as exc:
        param = f" (field: {exc.param})" if getattr(exc, "param", None) else ""
        status = getattr(exc, "status", None)
        code = EXIT_USAGE if status is not None and 400 <= int(status) < 500 else EXIT_FAILED
        fail(f"the API refused: {exc.message}{param} [HTTP {status}]", code)
    except httpx.TimeoutException:
        fail(f"timed out talking to the API at {url}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the API at {url} ({type(exc).__name__}: {exc}); "
             "is `hybrid-router up` or `hybrid-router api` running? (--url to change)")


# --- up / flower ------------------------------------------------------------------------------
def up(
    host: Annotated[str | None, typer.Option(help="Interface the API and Flower listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="API port (default: settings api_port).")] = None,
    flower_port: Annotated[int | None, typer.Option(help="Flower port (default: a free one).")] = None,
    sim_port: Annotated[int | None, typer.Option(
        help="Port of the simulator up starts (default: a free one).")] = None,
    redis_port: Annotated[int | None, typer.Option(
        help="Port of the private redis-server up starts when ROUTER_REDIS_URL does not answer "
             "(default: a free one).")] = None,
    log_dir: Annotated[Path | None, typer.Option(
        help="Where each process's log goes (kept after up stops; default: a new "
             "hybrid-router-up-* directory in the temp dir, printed in the banner).")] = None,
    logs: Annotated[bool, typer.Option("--logs/--no-logs",
                                       help="Echo every process's output here.")] = True,
    sim: Annotated[bool, typer.Option("--sim", help="Use the simulator even if a key is set.")] = False,
    sim_batch_turnaround: Annotated[float | None, typer.Option(
        help="Seconds the simulator takes to finish a batch (SIM_BATCH_TURNAROUND_S).")] = None,
    ready_timeout: Annotated[float, typer.Option(help="Seconds each process may take to be ready.")
                             ] = 60.0,
) -> None:
    """Run everything on this machine: Redis (if needed), API, both workers, beat, Flower and,
    without an upstream key, the simulator. Ctrl-C stops it all; the logs are kept."""
    from hybrid_router.router.cli.up import UpOptions, run_up

    settings = load_settings()
    options = UpOptions(
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        flower_port=flower_port,
        sim_port=sim_port,
        redis_port=redis_port,
        log_dir=log_dir,
        show_logs=logs,
        ready_timeout_s=ready_timeout,
        force_sim=sim,
        sim_batch_turnaround_s=sim_batch_turnaround,
    )
    raise typer.Exit(run_up(settings, options))


def flower(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    unauthenticated_api: Annotated[bool, typer.Option(
        help="Open Flower's HTTP API without auth (only when no basic auth is set).")] = False,
    url_prefix: Annotated[str | None, typer.Option(help="Serve under this path prefix.")] = None,
) -> None:
    """Run Flower for both lanes (basic auth from ROUTER_FLOWER_BASIC_AUTH=user:pass)."""
    import os

    from hybrid_router.workers.celery_app import create_celery

    settings = load_settings()
    celery_app = create_celery(settings)
    # Flower reads FLOWER_* from its environment; passing the secret there keeps it off `ps`.
    if settings.flower_basic_auth is not None:
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    elif unauthenticated_api:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    argv = ["flower", f"--address={host}", f"--port={port}"]
    if url_prefix:
        argv.append(f"--url_prefix={url_prefix}")
    celery_app.start(argv=argv)


# --- submit / tail ----------------------------------------------------------------------------
def _print_event(event: dict[str, Any], raw: bool) -> None:
    if raw:
        typer.echo(json.dumps(event, separators=(",", ":")))
        return
    kind = event.get("type")
    if kind == "token":
        sys.stdout.write(str(event.get("content", "")))
        sys.stdout.flush()
        return
    details = {k: v for k, v in event.items() if k not in ("type", "seq")}
    typer.echo(f"\n[{event.get('seq')}] {kind} {json.dumps(details, separators=(',', ':'))}"
               if kind in ("done", "error", "cancelled")
               else f"[{event.get('seq')}] {kind} {json.dumps(details, separators=(',', ':'))}",
               err=kind != "token")


def _exit_for(status: str) -> int:
    return EXIT_OK if status == "completed" else EXIT_FAILED


def _follow_stream(handle: RequestHandle, raw: bool, after_seq: int = 0) -> int:
    """Print events as they come; the exit code follows the terminal event."""
    status = "unknown"
    for event in handle.stream(after_seq=after_seq):
        _print_event(event, raw)
        kind = event.get("type")
        if kind == "done":
            status = str(event.get("status") or "completed")
        elif kind == "error":
            status = "failed"
        elif kind == "cancelled":
            status = "cancelled"
        if kind in ("done", "error", "cancelled"):
            break
    if not raw:
        sys.stdout.write("\n")  # the streamed text ends its line
        sys.stdout.flush()
    if status == "unknown":  # the stream ended without a terminal event: ask the record
        status = handle.status()
    return _exit_for(status)


def _wait_with_spinner(handle: RequestHandle, timeout: float | None) -> dict[str, Any]:
    """Poll the record until terminal, with a one-line spinner (elapsed time and status)."""
    started = time.monotonic()
    tty = sys.stderr.isatty()
    last_status, next_poll, record = "", 0.0, {}
    for frame in itertools.cycle(SPINNER):
        now = time.monotonic()
        if now >= next_poll:
            record = handle.record()
            next_poll = now + 1.0
        status = str(record.get("status", "?"))
        if status in ("completed", "failed", "cancelled"):
            if tty:
                sys.stderr.write("\r\033[K")
            return record
        elapsed = now - started
        if timeout is not None and elapsed > timeout:
            fail(f"still {status} after {timeout:g}s; follow it with `hybrid-router tail "
                 f"{handle.id}`")
        if tty:
            batch = f" batch {record['batch_id']}" if record.get("batch_id") else ""
            sys.stderr.write(f"\r{frame} {status}{batch}  {elapsed:5.1f}s")
            sys.stderr.flush()
        elif status != last_status:
            typer.echo(f"... {status} after {elapsed:.1f}s", err=True)
        last_status = status
        time.sleep(0.1)
    raise AssertionError("unreachable")


def _print_result(record: dict[str, Any], raw: bool) -> int:
    status = str(record.get("status"))
    if raw:
        typer.echo(json.dumps(record, separators=(",", ":")))
        return _exit_for(status)
    result = record.get("result") or {}
    if status == "completed":
        typer.echo(result.get("content", ""))
        usage = record.get("usage") or result.get("usage") or {}
        typer.echo(f"completed via {record.get('route')}: {usage.get('prompt_tokens', 0)} prompt + "
                   f"{usage.get('completion_tokens', 0)} completion tokens, cost "
                   f"${record.get('cost_usd', '?')}", err=True)
    else:
        error = record.get("error") or {}
        typer.echo(f"{status}: {error.get('code', '')} {error.get('message', '')}".rstrip(),
                   err=True)
    return _exit_for(status)


def submit(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    model: Annotated[str | None, typer.Option(help="Model (default: settings default_model).")
                     ] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens of the completion.")] = None,
    url: Annotated[str | None, typer.Option(help="API base URL (default from settings).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="API key (default: the first of ROUTER_API_KEYS).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after this many seconds.")
                       ] = None,
    raw: Annotated[bool, typer.Option("--json", help="Print events / the record as JSON.")] = False,
) -> None:
    """Send a prompt; print the stream as it comes (stream lane) or wait for the batch result."""
    from hybrid_router.router.client import RouterClient

    if priority not in PRIORITIES:
        fail(f"--priority must be one of {', '.join(PRIORITIES)} (got {priority!r})", EXIT_USAGE)
    settings = load_settings()
    base = url or default_api_url(settings)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    fields: dict[str, Any] = {}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    with client_errors(base), RouterClient(base, api_key or default_api_key(settings)) as client:
        handle = client.submit(messages, model=model, priority=priority, **fields)
        typer.echo(f"accepted {handle.id} (route: {handle.route}, priority: {priority})", err=True)
        if handle.route in ("stream", "flex"):  # the lanes that stream token by token
            code = _follow_stream(handle, raw)
            if not raw:
                code = _print_result(handle.record(), raw=False) if code else code
        else:
            code = _print_result(_wait_with_spinner(handle, timeout), raw)
    raise typer.Exit(code)


def tail(
    request_id: Annotated[str, typer.Argument(help="The request id.")],
    after: Annotated[int, typer.Option(help="Only events after this seq.")] = 0,
    url: Annotated[str | None, typer.Option(help="API base URL (default from settings).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="API key (default: the first of ROUTER_API_KEYS).")] = None,
    raw: Annotated[bool, typer.Option("--json", help="One JSON event per line.")] = False,
) -> None:
    """Follow a request's events (replayed from the start, then live) until it ends."""
    from hybrid_router.router.client import RouterClient

    settings = load_settings()
    base = url or default_api_url(settings)
    with client_errors(base), RouterClient(base, api_key or default_api_key(settings)) as client:
        handle = client.handle(request_id)
        handle.record()  # an unknown id is a clear 404 here, before any streaming
        code = _follow_stream(handle, raw, after)
    raise typer.Exit(code)


# --- status -----------------------------------------------------------------------------------
def _workers(settings: Settings, timeout: float) -> list[str]:
    from hybrid_router.workers.celery_app import create_celery

    app = create_celery(settings)
    try:
        replies = app.control.ping(timeout=timeout) or []
    finally:
        app.close()
    return sorted(node for reply in replies for node in reply)


def _usd(value: Any) -> str:
    return f"${float(value):.6f}"


def status(
    ping_timeout: Annotated[float, typer.Option(help="Seconds to wait for workers to answer.")
                            ] = 1.0,
    raw: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
) -> None:
    """Queues by lane and model, batches in flight, workers that answer, and the cost ledger."""
    import redis

    from hybrid_router.router.core.live_stats import take_live
    from hybrid_router.router.core.redis_io import safe_url
    from hybrid_router.router.core.stats import take_snapshot

    settings = load_settings()
    client = sync_client(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        snap = take_snapshot(client, settings)
        live = take_live(client, settings)
    except (redis.RedisError, OSError) as exc:
        fail(f"cannot read Redis at {safe_url(settings.redis_url)}: {exc}")
    finally:
        client.close()
    workers = _workers(settings, ping_timeout)
    data = snap.as_dict()
    data["live"] = live.as_dict()  # as GET /v1/stats has it
    data["workers"] = workers
    if raw:
        typer.echo(json.dumps(data, indent=2, default=str))
        raise typer.Exit(EXIT_OK)
    q = data["queues"]
    lines = [
        f"Redis     {safe_url(settings.redis_url)}  (prefix {settings.key_prefix})",
        f"Stream    {q['stream']['total']} dispatched/streaming, oldest waiting "
        f"{q['stream']['oldest_age_s']:.1f}s",
        f"Batch     {q['batch']['total']} queued, oldest {q['batch']['oldest_age_s']:.1f}s",
    ]
    for lane in ("stream", "batch"):
        for row in q[lane]["by_model"]:
            lines.append(f"  {lane:<7} {row['model']:<24} {row['state']:<11} {row['count']}")
    lines.append("Celery    " + ", ".join(f"{name}: {n} waiting"
                                          for name, n in data["celery_queues"].items()))
    last = data["last_flush"]
    ago = f"{time.time() - last['at']:.1f}s ago" if last["at"] is not None else "never"
    every = snap.flush_interval.describe() if snap.flush_interval else f"{snap.flush_interval_s:g}s"
    lines.append(f"Flush     every {every}; last {ago}"
                 + (f" ({last['submitted']} submitted in {last['batches']} batches"
                    + (f", error: {last['error']}" if last["error"] else "") + ")"
                    if last["at"] is not None else ""))
    beat = snap.beat
    if beat is None:
        lines.append("Beat      no beat has reported (is `hybrid-router beat` running?)")
    else:
        age = beat.age_s()
        poll = beat.values.get("poll_interval_s")
        lines.append(f"Beat      {beat.host} pid {beat.pid}, last tick "
                     + (f"{age:.1f}s ago" if age is not None else "never")
                     + (f"; polls every {poll:g}s" if poll is not None else ""))
    inflight = data["batches_in_flight"]
    lines.append(f"Batches   {inflight['total']} in flight"
                 + ("" if not inflight["by_status"] else " (" + ", ".join(
                     f"{s} {n}" for s, n in sorted(inflight["by_status"].items())) + ")"))
    lines.append("Workers   " + (", ".join(workers) if workers
                                  else f"none answered within {ping_timeout:g}s"))
    total = data["ledger"]["total"]
    lines.append(f"Ledger    {total['requests']} requests, {total['prompt_tokens']} prompt + "
                 f"{total['completion_tokens']} completion tokens; paid {_usd(total['cost_usd'])}, "
                 f"standard {_usd(total['standard_cost_usd'])}, saved {_usd(total['savings_usd'])}")
    for lane, metrics in data["latency"].items():
        ttft, e2e = metrics["ttft"], metrics["e2e"]
        if e2e["count"]:
            lines.append(f"Latency   {lane}: {e2e['count']} finished, mean e2e {e2e['mean_s']}s, "
                         f"mean ttft {ttft['mean_s']}s")
    typer.echo("\n".join(lines))
    raise typer.Exit(EXIT_OK)


def register(app: typer.Typer) -> None:
    """Add the operator verbs to the project's CLI."""
    app.command(short_help="Run everything on this machine (development).")(up)
    app.command(short_help="Run Flower (Celery's web monitor) for both lanes.")(flower)
    app.command(short_help="Send a prompt and print the answer.")(submit)
    app.command(short_help="Follow a request's events until it ends.")(tail)
    app.command(short_help="Queues, batches, workers, flush interval, beat, ledger.")(status)
