"""`edge-agent log ...`: inspect, replay, verify, export and compact the event log."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, BinaryIO

import orjson
import typer

from edge_agent.cli import display
from edge_agent.cli.options import ConfigOption, DbOption, JsonOption, open_log, parse_time
from edge_agent.config import load_config
from edge_agent.domain.events import EVENT_TYPES
from edge_agent.domain.view import state_view
from edge_agent.errors import ConfigError, LogCorrupted
from edge_agent.files import write_atomically
from edge_agent.lock import LOCK_NAME, DataDirLock
from edge_agent.log import archive
from edge_agent.log.compact import Retention, published, row_json
from edge_agent.log.compact import compact as compact_log
from edge_agent.log.journal import replay as replay_log
from edge_agent.log.store import Row
from edge_agent.log.verify import verify as verify_log

log_app = typer.Typer(help="Inspect, replay, verify, export and compact the event log.", no_args_is_help=True)

FOLLOW_POLL_S = 0.2


def _print_row(row: Row, as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(display.safe_json(row_json(row)) + b"\n")
    else:
        line = f"{row.seq:>8}  {row.ts}  {row.type:<16} {row.subject:<20} {row.data}"
        sys.stdout.write(display.printable(line) + "\n")


def _known_type(type_: str | None) -> None:
    """An unknown `--type` would match nothing, silently: name the types there are."""
    if type_ is not None and type_ not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        shown = display.printable(type_)
        raise ConfigError(f"--type: unknown event type {shown!r}; the types are: {known}", key="--type")


@log_app.command()
def show(
    config: ConfigOption = None,
    db: DbOption = None,
    from_seq: Annotated[int, typer.Option("--from", min=1, help="First seq to show.")] = 1,
    to_seq: Annotated[int | None, typer.Option("--to", min=1, help="Last seq to show.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only events of this type.")] = None,
    subject: Annotated[
        str | None, typer.Option("--subject", help="Only events about this order, station or lane.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events as they are logged.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Print events, one per line."""
    _known_type(type_)
    if to_seq is not None and to_seq < from_seq:  # else an empty range, silently
        raise ConfigError(f"--to {to_seq} is before --from {from_seq}", key="--to")
    if db is not None and archive.is_archive(db):
        if follow:
            raise ConfigError("--follow: an archive is never appended to", key="--follow")
        for row in archive.rows(db):
            if to_seq is not None and row.seq > to_seq:
                break
            if row.seq >= from_seq and type_ in (None, row.type) and subject in (None, row.subject):
                _print_row(row, as_json)
        sys.stdout.flush()
        return
    with open_log(config, db) as log_:
        next_seq = from_seq
        while True:
            # Read up to a head taken first, so that an event committed meanwhile is read next time.
            head = log_.head().seq
            stop = head if to_seq is None else min(to_seq, head)
            for row in log_.rows(next_seq, stop, type_=type_, subject=subject):
                _print_row(row, as_json)
            sys.stdout.flush()
            if not follow or (to_seq is not None and stop >= to_seq):
                return
            next_seq = max(next_seq, stop + 1)
            time.sleep(FOLLOW_POLL_S)  # SQLite has no cross-process change notification


@log_app.command()
def replay(
    config: ConfigOption = None,
    db: DbOption = None,
    to_seq: Annotated[int | None, typer.Option("--to", min=0, help="Replay up to and including this seq.")] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Replay the events logged at or before this time (ISO 8601; UTC if no zone)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Rebuild the state from the log up to a point and show it."""
    if to_seq is not None and until is not None:
        raise ConfigError("give --to or --until, not both", key="--until")
    until_ts = parse_time(until, "--until") if until is not None else None
    with open_log(config, db) as log_:
        end = log_.head().seq
        if to_seq is not None and to_seq > end:
            raise ConfigError(f"--to {to_seq}: the log ends at seq {end}", key="--to")
        total = log_.count(to_seq=to_seq)
        with display.progress("Replaying", total) as advance:
            state = replay_log(log_, to_seq, until=until_ts, progress=advance)
    view = state_view(state)
    if as_json:
        display.print_json(view)
    else:
        display.print_state(view)


@log_app.command()
def verify(config: ConfigOption = None, db: DbOption = None, as_json: JsonOption = False) -> None:
    """Check seq continuity, the hash chain, and that every snapshot equals replay. Exit 1 on a fault."""
    if db is not None and archive.is_archive(db):
        _verify_archive(db, as_json)
        return
    with open_log(config, db) as log_, display.progress("Verifying", log_.count()) as advance:
        verdict = verify_log(log_, progress=advance)
    _report(
        as_json,
        {
            "first_seq": verdict.first_seq,
            "last_seq": verdict.last_seq,
            "events": verdict.events,
            "snapshots": verdict.snapshots,
        },
        verdict.fault,
        f"ok: events {verdict.first_seq}..{verdict.last_seq} ({verdict.events}) chained and contiguous; "
        f"{verdict.snapshots} snapshot(s) equal replay"
        if verdict.events
        else "ok: the log holds no events (yet: a copy made without its -wal file holds none of a running log's)",
    )


def _verify_archive(path: Path, as_json: bool) -> None:
    verdict = archive.verify(path)
    unchecked = (
        None
        if verdict.first_link_checked or verdict.first_seq is None
        else f"event {verdict.first_seq}'s link to the event before it is not checked (that event is not here)"
    )
    _report(
        as_json,
        {
            "first_seq": verdict.first_seq,
            "last_seq": verdict.last_seq,
            "events": verdict.events,
            "snapshots": 0,
            "unchecked": unchecked,
        },
        verdict.fault,
        f"ok: archived events {verdict.first_seq}..{verdict.last_seq} ({verdict.events}) "
        f"chained and contiguous{'' if unchecked is None else '; ' + unchecked}"
        if verdict.events
        else "ok: the archive holds no events",
    )


def _report(as_json: bool, summary: dict[str, object], fault: LogCorrupted | None, ok_line: str) -> None:
    """A verdict of `log verify`: JSON or a line; exit 1 naming the first bad seq."""
    if as_json:
        reported = None if fault is None else {"seq": fault.seq, "reason": str(fault)}
        display.print_json({"ok": fault is None, **summary, "fault": reported})
    elif fault is None:
        display.out.print(ok_line, markup=False)
    if fault is not None:
        display.err.print(f"error: log verify failed at {display.printable(fault)}", markup=False)
        raise typer.Exit(1)


class ExportFormat(StrEnum):
    jsonl = "jsonl"


@log_app.command()
def export(
    config: ConfigOption = None,
    db: DbOption = None,
    format_: Annotated[ExportFormat, typer.Option("--format", help="Output format.")] = ExportFormat.jsonl,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --output file if it exists.")] = False,
) -> None:
    """Write every stored event, with its hash, as JSON lines."""
    with open_log(config, db) as log_:

        def write(target: BinaryIO) -> None:
            for row in log_.rows():
                target.write(display.safe_json(row_json(row, with_hash=True)) + b"\n")

        if output is None:
            write(sys.stdout.buffer)
            sys.stdout.flush()
            return
        # Never onto the log (nor its WAL and shared-memory files), never over a file
        # without --force, never through a symlink, and complete or not there at all.
        guarded = tuple(log_.path.with_name(log_.path.name + tail) for tail in ("", "-wal", "-shm"))
        database = _database_of(output)
        if database is not None and not output.exists() and database.resolve() != log_.path:
            # A new file there would be taken for that database's hot journal by every reader.
            # (An existing one, and the log read, are refused below.)
            raise ConfigError(f"--output: SQLite would read {output} as part of {database}; choose another name")
        write_atomically(output, write, force=force, protected=guarded, replaceable=_not_an_export)


_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
_FIRST_LINE_MAX = 1 << 20


def _database_of(path: Path) -> Path | None:
    """The existing file whose -wal, -shm or -journal SQLite would take `path` for."""
    for tail in _SQLITE_COMPANIONS:
        database = path.with_name(path.name.removesuffix(tail))
        if path.name.endswith(tail) and database.exists():
            return database
    return None


def _not_an_export(path: Path) -> str | None:
    """What the existing regular file `path` is, unless an earlier export (None: empty, or its
    first line is an exported event). `--force` replaces only that: any other log, its WAL,
    an agent's lock or a stranger's file is kept, whatever it is called."""
    if path.name == LOCK_NAME:
        return "a data folder's lock"
    if _database_of(path) is not None:
        return "the journal of an SQLite database"
    try:
        with path.open("rb") as stream:
            first = stream.readline(_FIRST_LINE_MAX)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if not first:
        return None
    if first.startswith(b"SQLite format 3\x00"):
        return "an SQLite database"
    try:
        event = orjson.loads(first)
    except orjson.JSONDecodeError:
        return "not an export of a log"
    if isinstance(event, dict) and "seq" in event and "hash" in event:
        return None
    return "not an export of a log"


@log_app.command()
def compact(
    config: ConfigOption = None,
    db: DbOption = None,
    retention: Annotated[
        Retention | None, typer.Option("--retention", help="What to do with old events \\[default: log.retention].")
    ] = None,
) -> None:
    """Archive or drop the events before the newest snapshot, per log.retention."""
    chosen = retention or Retention(load_config(config).log.retention)
    with open_log(config, db) as log_:  # a missing or foreign file is refused before a lock is made beside it
        path = log_.path  # symlinks resolved: the lock below is the real folder's
    # The agent's own lock: one writer per log, so never while the agent runs.
    with DataDirLock(path.parent, advice=", stop it first"), open_log(config, path, write=True) as log_:
        result = compact_log(log_, chosen, log_.path.parent / "archive")
        acknowledged = published(log_)
    if result.up_to_seq is None:
        display.out.print(
            f"nothing to compact (retention {chosen}; the broker has acknowledged events up to seq {acknowledged}, "
            "and no snapshot lies between the log's start and there)"
        )
        return
    where = f" to {result.archive}" if result.archive else ""
    display.out.print(f"{chosen}: removed {result.removed} events up to seq {result.up_to_seq}{where}")
