"""The command group class of the app: help that shows a flag as a flag.

typer renders every flag's type in help as `<bool>`, which reads as if `--json`
took a value (`--json true`). An empty metavar leaves the type column blank.
Applied where commands are resolved, so every command and subcommand (and each
one's `--help`) gets it, whichever module declares them.
"""

from __future__ import annotations

from typing import Any

import typer.core
from typer.core import TyperGroup


def _quiet_flags(command: Any, ctx: Any) -> None:
    params = [*command.params, command.get_help_option(ctx)]
    for param in params:
        if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            _quiet_flags(sub, ctx)


class Group(TyperGroup):
    """A TyperGroup whose commands' help shows flags without a `<bool>` type."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _quiet_flags(command, ctx)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _quiet_flags(self, ctx)
        super().format_help(ctx, formatter)
