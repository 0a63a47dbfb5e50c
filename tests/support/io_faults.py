"""A failing disk under the event log, at the sqlite3 boundary: for the I/O chaos tests.

The log's writer connection is opened as a `FaultyConnection`, a real
`sqlite3.Connection` (through `sqlite3.connect(..., factory=...)`) whose every
statement first asks the `Disk` behind it. Reads always pass. Writes are
counted, and from the `fail_at`-th write on the disk is broken: each write is
refused, before SQLite runs it, with the error SQLite itself gives for that
fault, until the test heals the disk.

Why statements and not bytes: SQLite's atomic commit means a statement that
hits a failing disk either takes effect whole or not at all, and a COMMIT that
fails leaves the transaction to be rolled back. So the states a real fault can
leave behind are exactly "every statement before the k-th ran, the k-th did
not" -- what refusing the k-th statement produces. (A commit durable on disk but
reported as failed, fsyncgate-style, is a different fault, not modelled here.)

What counts as a write: statements that change the file or take the write lock
(BEGIN IMMEDIATE, COMMIT, INSERT/UPDATE/DELETE/REPLACE, CREATE/DROP/ALTER, and
the PRAGMAs that write: journal_mode, wal_checkpoint, incremental_vacuum).
ROLLBACK is not one: in WAL mode it only drops the uncommitted frames and writes
nothing, so a failing disk cannot stop it. A fault that first meets BEGIN
IMMEDIATE is "database is locked" (another writer holds the lock); one that first
meets any other write is "database or disk is full" or "disk I/O error" (by the
write's number): the three storage faults the contract names, one kind per incident.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_WRITE = re.compile(
    r"\s*(BEGIN|COMMIT|END|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER"
    r"|PRAGMA\s+(journal_mode|wal_checkpoint|incremental_vacuum)\b)",
    re.IGNORECASE,
)


def is_write(sql: str) -> bool:
    return _WRITE.match(sql) is not None


_FAULTS = {  # SQLite's message, code and code name for each kind of fault
    "locked": ("database is locked", sqlite3.SQLITE_BUSY, "SQLITE_BUSY"),
    "io": ("disk I/O error", sqlite3.SQLITE_IOERR, "SQLITE_IOERR"),
    "full": ("database or disk is full", sqlite3.SQLITE_FULL, "SQLITE_FULL"),
}


def fault_kind(sql: str, write: int) -> str:
    """What broke when write number `write`, `sql`, failed first: taking the write lock
    fails when another writer holds it; writing fails as a full disk or an I/O error."""
    if sql.lstrip().upper().startswith("BEGIN"):
        return "locked"
    return "io" if write % 2 else "full"


def sqlite_error(kind: str) -> sqlite3.OperationalError:
    """The error SQLite raises for a fault of this kind."""
    message, code, name = _FAULTS[kind]
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    error.sqlite_errorname = name
    return error


class Disk:
    """The storage under one log file: counts its writes, fails them from `fail_at` on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.writes = 0  # write statements attempted, refused ones included
        self.refused = 0
        self.broken = False
        self.kind = "io"  # of the fault, once broken: one incident, one kind of error
        self.first_refused: str | None = None  # the statement the fault hit first
        self.statements: list[str] = []  # every write attempted, in order (for reports)
        self.refused_rows: list[Any] = []  # what refused multi-row writes carried: whose write it was
        self.on_refused: Callable[[], None] | None = None  # told of every refused write

    def heal(self) -> None:
        """The disk works again (space freed, the lock released, the cable reseated)."""
        self.broken = False
        self.fail_at = None

    def check(self, sql: str, rows: Sequence[Any] = ()) -> None:
        """Called before every statement (with the rows it carries); raises the
        fault if this write is refused."""
        if not is_write(sql):
            return
        self.writes += 1
        self.statements.append(" ".join(sql.split())[:60])
        if self.fail_at is not None and self.writes >= self.fail_at and not self.broken:
            self.broken = True
            self.kind = fault_kind(sql, self.writes)
            if self.first_refused is None:
                self.first_refused = self.statements[-1]
        if not self.broken:
            return
        self.refused += 1
        self.refused_rows.extend(rows)
        if self.on_refused is not None:
            self.on_refused()
        raise sqlite_error(self.kind)

    def break_now(self) -> None:
        """The disk fails from the next write on."""
        self.fail_at = self.writes + 1

    def break_after_lock(self) -> None:
        """The disk fails from the write after next on: the next transaction takes the write
        lock, then cannot write its rows (which `refused_rows` then shows)."""
        self.fail_at = self.writes + 2


def event_rows(sql: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The event rows a multi-row `INSERT INTO events ... VALUES (?, ...), (?, ...)` carries:
    its parameters are the rows' columns one after another."""
    if not sql.lstrip().upper().startswith("INSERT INTO EVENTS"):
        return []
    width = sql.count("?") // sql.count("(?")
    return [tuple(parameters[at : at + width]) for at in range(0, len(parameters), width)]


class FaultyConnection(sqlite3.Connection):
    """A real SQLite connection whose statements go through a `Disk` first."""

    disk: Disk

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self.disk.check(sql, event_rows(sql, parameters))
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        rows = list(parameters)  # an iterator is read once: kept for both
        self.disk.check(sql, rows)
        return super().executemany(sql, rows)


@contextmanager
def faulty_disk(disk: Disk, path: Path) -> Iterator[Disk]:
    """While the block runs, a log opened for writing at `path` sits on `disk`.

    Only that connection: read-only connections (opened by URI, as `log verify`
    and the CLI do) and every other file get plain SQLite."""
    real_connect = sqlite3.connect
    target = path.resolve()

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        ours = (
            isinstance(database, str | Path)
            and not str(database).startswith("file:")
            and Path(database).resolve() == target
            and "factory" not in kwargs
        )
        if not ours:
            db: sqlite3.Connection = real_connect(database, *args, **kwargs)
            return db
        faulty: FaultyConnection = real_connect(database, *args, factory=FaultyConnection, **kwargs)
        faulty.disk = disk
        return faulty

    sqlite3.connect = connect  # type: ignore[assignment]  # the store calls sqlite3.connect
    try:
        yield disk
    finally:
        sqlite3.connect = real_connect
