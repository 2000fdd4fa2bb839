"""`--help` of every verb reads well in an 80-column terminal (issue 20): no line wider than
the terminal, every option name whole, no literal markup (backquotes), no `<bool>` on flags,
and the verb list shows each verb's short help uncut."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hybrid_router.router.cli.main import app

COLUMNS = 80


def _commands() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = [()]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        paths.append((name,))
        paths += [(name, sub) for sub in getattr(command, "commands", {})]
    return paths


def _command(path: tuple[str, ...]) -> Any:
    """The command (typer vendors its own click, so: duck-typed)."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "hybrid-router")
def test_help_fits_80_columns(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(COLUMNS)},
                                terminal_width=COLUMNS)
    assert result.exit_code == 0, result.output
    text = result.output
    wide = [line for line in text.splitlines() if len(line) > COLUMNS]
    assert not wide, wide
    assert "`" not in text and "<bool>" not in text, text
    assert not re.search(r"\w\.\.\.$", text, flags=re.MULTILINE), text  # no cut-off short help
    for param in _command(path).params:
        if param.param_type_name == "option" and not param.hidden:
            for name in (*param.opts, *param.secondary_opts):
                assert re.search(rf"(^|[\s,/]){re.escape(name)}([\s,=]|$)", text,
                                 flags=re.MULTILINE), (name, text)
