"""`log compact`: bound the log's size by removing events a snapshot covers.

`keep` removes nothing; `archive` first writes the events to a gzip-compressed
JSONL file (private, written whole under a temporary name, fsynced, renamed into
place, the folder fsynced) and only then deletes them;
`drop` deletes them. The newest snapshot stays, and the log's base records
where the chain continues, so `log verify` still checks everything that is left.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import orjson

from edge_agent.files import OS_FILES, FileSystem, private_dir, write_atomically
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Row


class Retention(StrEnum):
    """What `log compact` does with the events a snapshot covers."""

    keep = "keep"
    archive = "archive"
    drop = "drop"


@dataclass(frozen=True, slots=True)
class Compaction:
    retention: Retention
    removed: int
    up_to_seq: int | None  # the log now starts after this seq
    archive: Path | None


def row_json(row: Row, *, with_hash: bool = False) -> bytes:
    """One event as a JSON line (the shape of `log show --json` and `log export`)."""
    record = {"seq": row.seq, "ts": row.ts, "type": row.type, "subject": row.subject, "data": orjson.loads(row.data)}
    if with_hash:
        record["hash"] = row.hash
    return orjson.dumps(record)


def published(log_: EventLog) -> int:
    """The last seq the broker has acknowledged (0: none)."""
    return log_.cursor(OUTBOX_CURSOR) or 0


def compact(log_: EventLog, retention: Retention, archive_dir: Path, *, files: FileSystem = OS_FILES) -> Compaction:
    """Remove the events before the newest intact snapshot, per `retention`; `files`: how
    the archive is made durable."""
    base = log_.base()
    # Never remove what the broker has not acknowledged: the log is the outbox. A log
    # whose outbox never saved a cursor has had nothing acknowledged at all.
    snapshot = log_.latest_snapshot(published(log_))
    if retention is Retention.keep or snapshot is None or snapshot.seq <= base.seq:
        return Compaction(retention, 0, None, None)
    archive = None
    if retention is Retention.archive:
        archive = archive_dir / f"events-{base.seq + 1:09d}-{snapshot.seq:09d}.jsonl.gz"
        _write_archive(log_, base.seq + 1, snapshot.seq, archive, files)
    removed = log_.cut(snapshot.seq, str(archive) if archive else None)
    return Compaction(retention, removed, snapshot.seq, archive)


def _write_archive(log_: EventLog, from_seq: int, to_seq: int, path: Path, files: FileSystem) -> None:
    """The archive, complete under its name before any event is deleted (or not there at
    all). An archive of the same range left by a compaction that stopped before its
    deletion holds the same events: it is replaced."""

    def write(raw: BinaryIO) -> None:
        with gzip.GzipFile(fileobj=raw, mode="wb") as archive:
            for row in log_.rows(from_seq, to_seq):
                archive.write(row_json(row, with_hash=True) + b"\n")

    private_dir(path.parent)
    write_atomically(path, write, force=True, option="archive", files=files)
