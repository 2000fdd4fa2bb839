"""Command line for the simulator: ``python -m hybrid_router.simulator`` and ``hybrid-router sim``.

The options are generated from :class:`SimConfig`'s fields so a new knob becomes a flag with no
extra code. Flags left out fall back to ``SIM_*`` environment variables, then to the defaults.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, get_origin

import typer

from hybrid_router.simulator.config import SimConfig


def _option_type(annotation: Any) -> Any:
    if get_origin(annotation) is list:
        return list[str]
    return annotation


def _knob_parameters() -> list[inspect.Parameter]:
    params: list[inspect.Parameter] = []
    for name, field in SimConfig.model_fields.items():
        ann = _option_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        if ann is bool:
            decls = [f"{flag}/--no-{name.replace('_', '-')}"]
        elif get_origin(ann) is list:
            decls = [flag.rstrip("s")]  # --model, --api-key (repeatable)
        else:
            decls = [flag]
        help_text = field.description or ""
        if get_origin(ann) is list:
            help_text += " (repeat the flag for several)"
        option = typer.Option(*decls, help=help_text, show_default=False)
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[ann | None, option],
        ))
    return params


def config_from_options(options: dict[str, Any]) -> SimConfig:
    """A ``SimConfig`` from the given options; ``None`` means "not given"."""
    overrides = {k: v for k, v in options.items() if v is not None and v != []}
    return SimConfig(**overrides)


def _sim(host: str, port: int, **knobs: Any) -> None:
    from hybrid_router.simulator.server import serve

    config = config_from_options(knobs)
    typer.echo(f"OpenAI-compatible simulator on http://{host}:{port}/v1 "
               f"(batch_api={config.batch_api})", err=True)
    serve(host, port, config)


def _build_command() -> Any:
    def sim(**kwargs: Any) -> None:
        """Run the OpenAI-compatible upstream simulator (chat, responses, embeddings,
        streaming, files, batches)."""
        _sim(**kwargs)

    params = [
        inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, default="127.0.0.1",
                          annotation=Annotated[str, typer.Option("--host", help="Bind address.")]),
        inspect.Parameter("port", inspect.Parameter.KEYWORD_ONLY, default=8900,
                          annotation=Annotated[int, typer.Option("--port", help="Bind port.")]),
        *_knob_parameters(),
    ]
    sim.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    sim.__annotations__ = {p.name: p.annotation for p in params}
    return sim


sim_command = _build_command()


def register(app: typer.Typer) -> None:
    """Add the ``sim`` command to the project's typer app."""
    app.command("sim", short_help="Run the OpenAI-compatible upstream simulator.")(sim_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m hybrid_router.simulator``."""
    app = typer.Typer(add_completion=False, help="OpenAI-compatible upstream simulator.")
    app.command()(sim_command)
    app(args=argv, prog_name="python -m hybrid_router.simulator")


__all__ = ["config_from_options", "main", "register"]
