"""`edge-agent upgrade check`: can this release take over a log, and what it will do with it."""

from __future__ import annotations

import dataclasses

import orjson
import typer

from edge_agent import __version__
from edge_agent.cli import display
from edge_agent.cli.options import ConfigOption, DbOption, JsonOption, open_log
from edge_agent.errors import ConfigError
from edge_agent.formats import Survey, survey

upgrade_app = typer.Typer(
    help="Check that this release can take over a log before switching to it.", no_args_is_help=True
)


@upgrade_app.command()
def check(config: ConfigOption = None, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Say (read-only) whether this release can take the log over, and what it does with each live item."""
    if config is not None and db is not None:
        raise ConfigError("give --config or --db, not both", key="--db")
    with open_log(config, db) as log_:
        found = survey(log_)
    if as_json:
        view = {"ok": found.ok, **dataclasses.asdict(found)}
        display.print_json(orjson.loads(orjson.dumps(view, option=orjson.OPT_NON_STR_KEYS)))  # versions as keys
    else:
        _print(found)
    if not found.ok:
        raise typer.Exit(1)


def _print(found: Survey) -> None:
    view = dataclasses.asdict(found)
    out = display.out
    out.print(f"this release: edge-agent {__version__}", markup=False)
    out.print(f"written by: {', '.join(view['releases']) or 'unknown'}", markup=False)
    formats = ", ".join(f"format {v}: {n}" for v, n in sorted(view["snapshot_formats"].items())) or "none"
    out.print(f"snapshots: {formats}", markup=False)
    for line in view["upcasts"]:
        out.print(f"upcast: {line}", markup=False)
    if view["last_seq"] is not None:
        out.print(f"log at seq {view['last_seq']}, {len(view['items'])} live work item(s)", markup=False)
    for item in view["items"]:
        line = f"  {item['order_id']}  {item['stage']}  {item['steps_done']} step(s) done: {item['action']}"
        out.print(display.printable(line), markup=False)
    if view["problems"]:
        for problem in view["problems"]:
            display.err.print(f"not safe: {display.printable(problem)}", markup=False)
    else:
        out.print(f"ok: edge-agent {__version__} can take this log over", markup=False)
