"""Options shared by the commands, and how they turn into a config and a log."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from edge_agent.config import load_config
from edge_agent.domain.moments import iso
from edge_agent.errors import ConfigError, LogError
from edge_agent.log import archive
from edge_agent.log.store import EventLog

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="Config file \\[default: ./config.yaml, else /etc/edge-agent/config.yaml]."),
]
DbOption = Annotated[
    Path | None,
    typer.Option("--db", help="Read this log file directly (a copy, an archive) instead of the configured one."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _given_db(config: Path | None, db: Path | None) -> Path:
    return db if db is not None else load_config(config).events_db


def db_path(config: Path | None, db: Path | None) -> Path:
    """The log file a command works on: `--db`, else the configured one, with symlinks
    resolved: the lock that guards it is the one beside the real file, not beside a link."""
    return _given_db(config, db).resolve()


@contextmanager
def open_log(config: Path | None, db: Path | None, *, write: bool = False) -> Iterator[EventLog]:
    """Open an existing log; never creates one (a typo must not make an empty log). A file
    SQLite finds damaged while it is read is one line naming it (exit 1), not a traceback."""
    given = _given_db(config, db)
    if not given.is_file():
        raise ConfigError(f"no log at {given}", key="--db")
    if archive.is_archive(given):  # read by `log show` and `log verify` alone
        raise ConfigError(f"{given}: {archive.ONLY_SHOW_OR_VERIFY}", key="--db")
    path = given.resolve()
    if path.stat().st_nlink > 1:
        # SQLite finds a log's -wal by the name it is opened under: under another name a
        # running agent's latest events are not seen (and its lock, by the other name,
        # guards nothing here).
        raise ConfigError(
            f"{given} has other hard links (it may be a running agent's log under another name); "
            "open it by its own name (reading a running agent's log is safe)",
            key="--db",
        )
    with EventLog(path, readonly=not write) as log_:
        try:
            yield log_
        except sqlite3.DatabaseError as error:
            # OperationalError (locked, I/O) is a subclass: only the base class says the file is bad.
            damaged = " (the file is damaged)" if type(error) is sqlite3.DatabaseError else ""
            raise LogError(f"cannot read the log {given}: {error}{damaged}") from error


def parse_time(value: str, option: str) -> str:
    """An ISO 8601 time (naive = UTC) in the log's `ts` format."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise ConfigError(f"{option}: {value!r} is not an ISO 8601 time (e.g. 2026-11-27T14:05:00Z)") from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return iso(moment)
