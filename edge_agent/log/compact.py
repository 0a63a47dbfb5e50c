"""`log compact`: bound the log's size by removing events a snapshot covers.

`keep` removes nothing; `archive` first writes the events to a gzip-compressed
JSONL file (private, written whole under a temporary name, fsynced, renamed into
place, the folder fsynced) and only then deletes them;
`drop` deletes them. The newest snapshot stays, and the log's base records
where the chain continues, so `log verify` still checks everything that is left.

The cut runs in slices (`EventLog.cut_slice`): a compaction that stopped half-way
(the process died) left a whole log whose base names the archive it was cutting
to; the next compaction finishes that cut first, without archiving those events
twice. Archives are named by the range they hold, so the oldest are removed first
when `log.archive_max_mb` asks for room (`prune_archives`).
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import orjson

from edge_agent.files import OS_FILES, FileSystem, fsync_dir, private_dir, write_atomically
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Row

log = logging.getLogger(__name__)

_ARCHIVE_NAME = re.compile(r"^events-(\d{9,})-(\d{9,})\.jsonl\.gz$")


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


@dataclass(frozen=True, slots=True)
class Plan:
    """The next compaction: the events `from_seq`..`to_seq` (a snapshot's seq) go, into
    `archive` if there is one; `resumed`: a cut that stopped half-way, its archive written."""

    from_seq: int
    to_seq: int
    archive: Path | None
    resumed: bool = False


def archive_path(archive_dir: Path, from_seq: int, to_seq: int) -> Path:
    return archive_dir / f"events-{from_seq:09d}-{to_seq:09d}.jsonl.gz"


def archive_range(path: Path) -> tuple[int, int] | None:
    """The seqs an archive holds, from its name (None: not an archive's name)."""
    match = _ARCHIVE_NAME.match(path.name)
    return (int(match[1]), int(match[2])) if match else None


def plan(log_: EventLog, retention: Retention, archive_dir: Path, up_to: int | None = None) -> Plan | None:
    """What to compact now (None: nothing): up to the newest intact snapshot the broker
    has acknowledged, and no further than `up_to` if given."""
    base = log_.base()
    if base.archive is not None:  # a cut towards the end of this archive may have stopped half-way
        written = archive_range(Path(base.archive))
        if written is not None and written[1] > base.seq and written[1] in log_.snapshot_seqs():
            return Plan(base.seq + 1, written[1], Path(base.archive), resumed=True)
    # Never remove what the broker has not acknowledged: the log is the outbox. A log
    # whose outbox never saved a cursor has had nothing acknowledged at all.
    limit = published(log_) if up_to is None else min(published(log_), up_to)
    snapshot = log_.latest_snapshot(limit)
    if retention is Retention.keep or snapshot is None or snapshot.seq <= base.seq:
        return None
    archive = archive_path(archive_dir, base.seq + 1, snapshot.seq) if retention is Retention.archive else None
    return Plan(base.seq + 1, snapshot.seq, archive)


def compact(log_: EventLog, retention: Retention, archive_dir: Path, *, files: FileSystem = OS_FILES) -> Compaction:
    """Remove the events before the newest intact snapshot, per `retention`; `files`: how
    the archive is made durable."""
    planned = plan(log_, retention, archive_dir)
    if planned is None:
        return Compaction(retention, 0, None, None)
    if planned.archive is not None and not planned.resumed:
        write_archive(log_, planned, files=files)
    removed = log_.cut(planned.to_seq, str(planned.archive) if planned.archive else None)
    return Compaction(retention, removed, planned.to_seq, planned.archive)


def write_archive(log_: EventLog, planned: Plan, *, files: FileSystem = OS_FILES) -> None:
    """Write the archive of `planned` from `log_` (any connection to the log: a reader's will do)."""
    if planned.archive is not None:
        _write_archive(log_, planned.from_seq, planned.to_seq, planned.archive, files)


def archives(archive_dir: Path) -> list[tuple[Path, int]]:
    """The archives in `archive_dir` (files named as compaction names them), oldest first,
    with their sizes."""
    try:
        found = [path for path in archive_dir.iterdir() if archive_range(path) is not None]
    except FileNotFoundError:
        return []
    listed = []
    for path in sorted(found, key=lambda path: archive_range(path) or (0, 0)):
        try:
            listed.append((path, path.lstat().st_size))
        except FileNotFoundError:
            continue
    return listed


def prune_archives(archive_dir: Path, max_bytes: int) -> list[Path]:
    """Remove the oldest archives until the rest hold at most `max_bytes`; each removal
    is logged. The archives removed, oldest first."""
    listed = archives(archive_dir)
    total = sum(size for _, size in listed)
    removed = []
    for path, size in listed:
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
        log.info("archive %s removed (%d bytes): the archives keep to %d bytes", path.name, size, max_bytes)
    if removed:
        fsync_dir(archive_dir)
    return removed


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
