"""How a file says it is an edge-agent log, read before anything opens it as one.

A log carries `PRAGMA application_id` from its creation (a log from before that
label is known by its recorded migrations). Every command first reads the file's
header, so a foreign database, random bytes or an empty file is refused with
nothing written, not even a -wal or -shm beside it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import ConfigError, LogError
from edge_agent.log.schema import MIGRATIONS

# `PRAGMA application_id` of every edge-agent log ("EAlg"): how a file says it is one.
APPLICATION_ID = 0x45416C67
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100


def open_readonly(path: Path, *, immutable: bool = False) -> sqlite3.Connection:
    """A read-only connection; `immutable`: SQLite reads the file alone, creating nothing
    beside it (no -wal or -shm), which is right only while no -wal file exists."""
    query = "mode=ro&immutable=1" if immutable else "mode=ro"
    db = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


@dataclass(frozen=True, slots=True)
class Provenance:
    """What a log says about the releases that wrote it: its applied migrations, and per
    release (from 0.2.0 on) the formats that release writes, as JSON."""

    migrations: frozenset[str]
    writers: dict[str, str]  # release -> formats


def provenance(path: Path) -> Provenance:
    """Read, without writing anything (not even a -wal or -shm beside it), which migrations
    and releases the existing log `path` records (identify it first)."""
    db = open_readonly(path, immutable=not path.with_name(f"{path.name}-wal").exists())
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        migrations = frozenset(name for (name,) in db.execute("SELECT name FROM schema_migrations"))
        writers = dict(db.execute("SELECT release, formats FROM writers")) if "writers" in tables else {}
    except sqlite3.Error as error:
        raise LogError(f"cannot read the log {path}: {error}") from error
    finally:
        db.close()
    return Provenance(migrations, writers)


def identify(path: Path) -> bool:
    """Whether the existing file `path` is labelled an edge-agent log (False: a log from
    before the label, known by its recorded migrations). Anything else is refused with
    ConfigError; the file is only read, and a file that is not an SQLite database is
    not even opened as one."""
    try:
        with open(path, "rb") as stream:
            header = stream.read(_HEADER_BYTES)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from error
    if not header:
        raise ConfigError(f"{path} is empty, not an edge-agent log")
    if len(header) < _HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        raise ConfigError(f"{path} is not an edge-agent log (not an SQLite database)")
    application_id = int.from_bytes(header[68:72], "big")
    if application_id not in (0, APPLICATION_ID):
        raise ConfigError(f"{path} is not an edge-agent log (another application's database: id {application_id:#x})")
    try:
        # A database in WAL mode opened read-only gets a -wal and -shm file beside it: not
        # for one that may be another program's, unless it has a -wal (which then matters).
        db = open_readonly(path, immutable=not path.with_name(f"{path.name}-wal").exists())
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            recorded = (
                {name for (name,) in db.execute("SELECT name FROM schema_migrations")}
                if "schema_migrations" in tables
                else set()
            )
        finally:
            db.close()
    except sqlite3.Error as error:
        if application_id == APPLICATION_ID:  # labelled a log, but it cannot be read: a damaged one
            raise LogError(f"cannot read the log {path}: {error} (the file is damaged)") from error
        raise ConfigError(f"{path} is not an edge-agent log ({error})") from error
    # The label alone is not enough: a log is made whole under a temporary name, so an
    # existing one always has its tables and its first migration recorded.
    if "events" not in tables or MIGRATIONS[0][0] not in recorded:
        raise ConfigError(f"{path} is not an edge-agent log (no events table or recorded migrations)")
    return application_id == APPLICATION_ID
