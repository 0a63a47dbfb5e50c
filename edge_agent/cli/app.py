"""The root command: global options, error reporting, `run` and `status`."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click; no public name

from edge_agent import __version__
from edge_agent.cli import display
from edge_agent.cli.group import Group
from edge_agent.cli.log import log_app
from edge_agent.cli.options import ConfigOption, DbOption, JsonOption, db_path, open_log
from edge_agent.cli.order import order_app
from edge_agent.cli.profile import profile_app
from edge_agent.cli.upgrade import upgrade_app
from edge_agent.clock import SystemClock
from edge_agent.config import load_config
from edge_agent.domain.view import state_view
from edge_agent.errors import EdgeAgentError
from edge_agent.lock import holder
from edge_agent.log.journal import replay
from edge_agent.log.store import OUTBOX_CURSOR

app = typer.Typer(
    name="edge-agent",
    help="Durable, event-sourced controller for a small factory cell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)
app.add_typer(log_app, name="log")
app.add_typer(profile_app, name="profile")
app.add_typer(order_app, name="order")
app.add_typer(upgrade_app, name="upgrade")


def _version(value: bool) -> None:
    if value:
        print(f"edge-agent {__version__}")
        raise typer.Exit()


@dataclass
class RootOptions:
    """The options given before the command, for the command and for `main`'s error report."""

    debug: bool = False


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Durable, event-sourced controller for a small factory cell."""
    ctx.ensure_object(RootOptions).debug = debug


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command()
def run(
    ctx: typer.Context,
    config: ConfigOption = None,
    demo: Annotated[int, typer.Option("--demo", min=0, help="Submit this many demo orders in-process at start.")] = 0,
    log_level: Annotated[
        LogLevel | None, typer.Option("--log-level", help="Overrides log_level of the config.")
    ] = None,
) -> None:
    """Run the agent in the foreground (what systemd runs)."""
    from edge_agent.service import run_agent  # the CLI's other commands need none of the runtime

    settings = load_config(config)
    level = "debug" if ctx.ensure_object(RootOptions).debug else (log_level or settings.log_level)
    setup_logging(level)
    run_agent(settings, demo, config)


def setup_logging(level: str) -> None:
    """One line per event on stdout; under journald (JOURNAL_STREAM set) without our own
    timestamp, since the journal stamps every line itself."""
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level.upper(), format=stamp + "%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for chatty in ("amqtt", "transitions"):  # the embedded broker's libraries log every step at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)


@app.command()
def status(config: ConfigOption = None, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Whether the agent runs; live work items, stations, lane, e-stop and log position (read-only)."""
    with open_log(config, db) as log_:
        state = replay(log_, verify=False)
        published = log_.cursor(OUTBOX_CURSOR) or 0
        # After the log is read: a log that exists has a folder, and an agent that stopped
        # meanwhile is not reported running beside a state it no longer changes.
        running = holder(db_path(config, db).parent)
    view = state_view(state, SystemClock().now())
    # What the broker has acknowledged: a broker refusing or unreachable shows as events waiting.
    view["outbox"] = {"published_seq": published, "waiting": max(state.last_seq - published, 0)}
    view["agent"] = {
        "running": running is not None,
        "pid": running.pid if running else None,
        "since": running.since if running else None,
    }
    if as_json:
        display.print_json(view)
    else:
        display.print_state(view)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def main() -> None:
    """The console script: errors become one line on stderr and an exit code."""
    options = RootOptions()
    try:
        try:
            # Not standalone: usage errors come here, to be one line like every other error.
            code = app(standalone_mode=False, obj=options)
        except BaseExceptionGroup as group:  # from a TaskGroup: report the first real error
            raise _first_error(group) from group
    except NoArgsIsHelpError as error:  # `edge-agent log`: the group's help, as ever
        display.out.print(error.format_message(), markup=False, end="")
        sys.exit(error.exit_code)
    except UsageError as error:
        display.err.print(f"error: {_usage_line(error)}", markup=False)
        sys.exit(error.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    except EdgeAgentError as error:
        if options.debug:
            traceback.print_exc()
        display.err.print(f"error: {display.printable(error)}", markup=False)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # `edge-agent log show | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except Exception as error:  # a bug or an environment fault: still one line, unless --debug
        if options.debug:
            traceback.print_exc()
        display.err.print(
            f"error: {type(error).__name__}: {display.printable(error)} (run with --debug for details)", markup=False
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) returns n when not standalone


def _usage_line(error: UsageError) -> str:
    """click's message on one line, with where to find the usage instead of the usage itself."""
    message = " ".join(display.printable(error.format_message()).split())
    if error.ctx is None:
        return message
    return f"{message} (see '{error.ctx.command_path} --help')"
