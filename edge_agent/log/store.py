"""The SQLite event log: append in one transaction, read by range, snapshots.

One writer (the agent) and any number of readers (the CLI) share the file;
WAL mode lets readers see a consistent prefix while the writer appends.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from hashlib import sha256
from pathlib import Path
from types import TracebackType
from typing import Literal

import msgspec
import orjson

from edge_agent.clock import Clock, SystemClock
from edge_agent.domain.codec import (
    event_from_json,
    events_to_json,
    records_from_rows,
    state_from_dict,
    state_to_dict,
)
from edge_agent.domain.events import (
    PAYLOAD_VERSION,
    AgentStarted,
    Event,
    InventoryIssued,
    OrderAccepted,
    OrderCancelled,
    OrderFailed,
    Recorded,
)
from edge_agent.domain.moments import iso
from edge_agent.domain.state import State
from edge_agent.domain.upcast import SNAPSHOT_FORMAT_KEY
from edge_agent.errors import ConfigError, LogCorrupted, LogError
from edge_agent.files import create_private_file, fsync_dir, private_dir
from edge_agent.log.identity import APPLICATION_ID, identify, open_readonly
from edge_agent.log.schema import CANCELLED, FAILED, MIGRATIONS, migrate

GENESIS_HASH = "0" * 64
OUTBOX_CURSOR = "outbox"  # the MQTT outbox: events up to here are acknowledged by the broker
Synchronous = Literal["full", "normal"]
# How the writer's connection is made: any SQLite library behind `sqlite3.Connection`'s
# interface, in autocommit mode (transactions are opened explicitly with BEGIN IMMEDIATE).
Connect = Callable[[Path], sqlite3.Connection]
_READ_BATCH = 5000
WAL_LIMIT_BYTES = 1 << 20  # the WAL file is truncated to this whenever a checkpoint lets it start over
CUT_SLICE_EVENTS = 1000  # a cut removes at most this many events per transaction (or one snapshot interval)
_MAX_IDS_PER_QUERY = 500  # bound parameters per `known_orders` query: below SQLite's oldest limit of 999


def chain_hash(prev: str, seq: int, ts: str, type_: str, subject: str, data: str) -> str:
    """The hash of one event, chained to the hash of the one before it."""
    return sha256(f"{prev}\x1f{seq}\x1f{ts}\x1f{type_}\x1f{subject}\x1f{data}".encode()).hexdigest()


class Row(msgspec.Struct, frozen=True, gc=False):
    """An event row as stored: the text the hash was computed over. (A Struct: a
    replay builds one per event, and a frozen dataclass costs ten times as much.)"""

    seq: int
    ts: str
    type: str
    subject: str
    data: str
    hash: str

    def decode(self) -> Recorded:
        return Recorded(self.seq, self.ts, event_from_json(self.type, self.data, self.seq))

    def expected_hash(self, prev: str) -> str:
        return chain_hash(prev, self.seq, self.ts, self.type, self.subject, self.data)


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    ts: str
    state: State
    event_hash: str


@dataclass(frozen=True, slots=True)
class Base:
    """Where the stored log starts: after `seq`, chained to `hash`."""

    seq: int
    hash: str
    archive: str | None = None


class Transaction:
    """Appends and snapshots that commit together or not at all."""

    def __init__(self, db: sqlite3.Connection, clock: Clock, head: Base) -> None:
        self._db = db
        self._clock = clock
        self.head = head

    def append(self, events: Sequence[Event]) -> list[Recorded]:
        ts = iso(self._clock.now())
        first = self.head.seq + 1
        prev = self.head.hash
        values: list[object] = []  # the rows' columns one after another, as `_insert` binds them
        accepted: list[tuple[str, str, int]] = []
        ended: list[tuple[str, int, str]] = []
        for seq, event, data in zip(range(first, first + len(events)), events, events_to_json(events), strict=True):
            type_ = type(event).__name__
            prev = chain_hash(prev, seq, ts, type_, event.subject, data)
            values += (seq, ts, type_, event.subject, data, prev)
            if isinstance(event, OrderAccepted):
                accepted.append((event.order_id, event.digest, seq))
            elif isinstance(event, InventoryIssued | OrderFailed | OrderCancelled):
                ended.append((_outcome(event), seq, event.order_id))
        _insert(self._db, values)
        # The idempotency record, in the same transaction as the events it follows. A second
        # acceptance of one id fails the primary key: it would be a bug, never overwritten.
        if accepted:
            self._db.executemany("INSERT INTO orders (order_id, digest, accepted_seq) VALUES (?, ?, ?)", accepted)
        if ended:
            self._db.executemany("UPDATE orders SET outcome = ?, outcome_seq = ? WHERE order_id = ?", ended)
        self.head = Base(first + len(events) - 1, prev)
        return [Recorded(seq, ts, event) for seq, event in enumerate(events, first)]

    def save_snapshot(self, state: State) -> None:
        """Store `state`, which must be the state after the last appended event."""
        if state.last_seq != self.head.seq:
            raise LogError(f"snapshot at seq {state.last_seq} does not match the log head {self.head.seq}")
        text = orjson.dumps(state_to_dict(state)).decode()
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots (seq, ts, state, event_hash, checksum) VALUES (?, ?, ?, ?, ?)",
            (state.last_seq, iso(self._clock.now()), text, self.head.hash, _checksum(text)),
        )


@dataclass(frozen=True)
class OrderRecord:
    """An order's line in the idempotency record."""

    digest: str  # of its body
    outcome: str | None  # its inventory id, FAILED or CANCELLED; None while it is live
    outcome_seq: int | None  # the event that ended it


class EventLog:
    """One `events.db` file, opened for writing (the agent) or reading (the CLI)."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        clock: Clock | None = None,
        readonly: bool = False,
        connect: Connect | None = None,
    ) -> None:
        """`connect`: how the writer's connection is made (by default the standard library's
        `sqlite3`; the power-cut tests give one through a VFS that loses unsynced writes)."""
        self.path = path
        self.readonly = readonly
        self._clock = clock or SystemClock()
        self._open = connect or connect_sqlite3
        try:
            self._db = self._connect(path, synchronous, readonly)
        except (sqlite3.Error, OSError) as error:  # OSError: creating the log or its folder
            raise LogError(f"cannot open the log {path}: {error}") from error

    def _connect(self, path: Path, synchronous: Synchronous, readonly: bool) -> sqlite3.Connection:
        if readonly:
            if not path.is_file():
                raise ConfigError(f"no log at {path}")
            identify(path)
            return open_readonly(path)
        if path.exists():
            # Read-only first: a file that is not a log is refused before anything writes to it.
            labelled = identify(path)
        else:
            self._create(path)
            labelled = True
        db = self._open(path)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise LogError(f"{path}: the file system does not support WAL mode")
            db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")  # a reset WAL is cut back to this
            migrate(db, iso(self._clock.now()))
            if not labelled:  # a log from before logs said what they are
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        except BaseException:
            db.close()
            raise
        return db

    def _create(self, path: Path) -> None:
        """A new, empty log at `path`, private (0640, its folder 0750), labelled as a log and
        with its schema, made under a temporary name and renamed into place: there is
        never a file at `path` that is not a whole log."""
        private_dir(path.parent)
        partial = path.with_name(f".{path.name}.{os.getpid()}.new")
        partial.unlink(missing_ok=True)
        create_private_file(partial)
        try:
            db = sqlite3.connect(partial, isolation_level=None)
            try:
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                # Set before the first table exists, so compaction can give pages back.
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")
                migrate(db, iso(self._clock.now()))
            finally:
                db.close()  # the last connection: the WAL is checkpointed into the file and removed
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def close(self) -> None:
        self._db.close()

    @property
    def synchronous(self) -> Synchronous:
        """How durably a commit is written, as the connection has it now (`PRAGMA synchronous`)."""
        (level,) = self._db.execute("PRAGMA synchronous").fetchone()
        return "full" if level >= 2 else "normal"

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction; committed (durably, per `synchronous`) on exit."""
        if self.readonly:
            raise LogError(f"{self.path} is open read-only")
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise LogError(f"cannot write to the log: {error}") from error
        try:
            # Read the head inside the write lock: a second writer cannot slip in between.
            yield Transaction(self._db, self._clock, self.head())
            self._db.execute("COMMIT")
        except BaseException as error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise LogError(f"cannot write to the log: {error}") from error
            raise

    def append(self, events: Sequence[Event]) -> list[Recorded]:
        """Append `events` in one transaction (a group commit)."""
        with self.transaction() as tx:
            return tx.append(events)

    # -- reading ---------------------------------------------------------------

    def base(self) -> Base:
        row = self._db.execute("SELECT seq, hash, archive FROM log_base WHERE id = 1").fetchone()
        return Base(*row) if row else Base(0, GENESIS_HASH)

    def head(self) -> Base:
        """The last stored event's seq and hash (the base if there is none)."""
        row = self._db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return Base(*row) if row else self.base()

    def count(self, from_seq: int = 1, to_seq: int | None = None) -> int:
        (n,) = self._db.execute(
            "SELECT count(*) FROM events WHERE seq >= ? AND seq <= ?",
            (from_seq, to_seq if to_seq is not None else 2**62),
        ).fetchone()
        return int(n)

    def rows(
        self,
        from_seq: int = 1,
        to_seq: int | None = None,
        *,
        type_: str | None = None,
        subject: str | None = None,
        limit: int | None = None,
    ) -> Iterator[Row]:
        """Stored rows in seq order, filtered; one consistent read of the file."""
        sql = "SELECT seq, ts, type, subject, data, hash FROM events WHERE seq >= ? AND seq <= ?"
        args: list[object] = [from_seq, to_seq if to_seq is not None else 2**62]
        if type_ is not None:
            sql += " AND type = ?"
            args.append(type_)
        if subject is not None:
            sql += " AND subject = ?"
            args.append(subject)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        cursor = self._db.execute(sql, args)
        try:
            while batch := cursor.fetchmany(_READ_BATCH):
                for values in batch:
                    yield Row(*values)
        finally:
            with suppress(sqlite3.ProgrammingError):  # the log was closed under a paused reader
                cursor.close()

    def last_seq_until(self, until: str) -> int:
        """The last seq before the first event stamped after `until` (ISO 8601 UTC).

        The first such event ends the range even if the wall clock later went
        back, so the result is always a prefix of the log."""
        (after,) = self._db.execute("SELECT min(seq) FROM events WHERE ts > ?", (until,)).fetchone()
        return int(after) - 1 if after is not None else self.head().seq

    def probe_write(self) -> None:
        """Prove the file can be written (LogError if not), changing nothing."""
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO cursors (name, seq) VALUES ('probe', 0)")
            self._db.execute("DELETE FROM cursors WHERE name = 'probe'")

    def cursor(self, name: str) -> int | None:
        """How far the consumer `name` has got (None if it never said)."""
        row = self._db.execute("SELECT seq FROM cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else None

    def save_cursor(self, name: str, seq: int) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO cursors (name, seq) VALUES (?, ?)", (name, seq))

    def read(self, from_seq: int = 1, to_seq: int | None = None) -> Iterator[Recorded]:
        """Decoded events in seq order (their hashes unchecked: see `rows` for that)."""
        cursor = self._db.execute(
            "SELECT seq, ts, type, data FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq",
            (from_seq, to_seq if to_seq is not None else 2**62),
        )
        try:
            while batch := cursor.fetchmany(_READ_BATCH):
                yield from records_from_rows(batch)
        finally:
            with suppress(sqlite3.ProgrammingError):  # the log was closed under a paused reader
                cursor.close()

    def snapshot_seqs(self) -> list[int]:
        return [seq for (seq,) in self._db.execute("SELECT seq FROM snapshots ORDER BY seq")]

    def snapshot(self, seq: int) -> Snapshot:
        """The snapshot at `seq`; LogCorrupted if it is damaged."""
        row = self._db.execute("SELECT ts, state, event_hash, checksum FROM snapshots WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise LogError(f"no snapshot at seq {seq}")
        ts, text, event_hash, checksum = row
        if _checksum(text) != checksum:
            raise LogCorrupted(seq, "snapshot checksum mismatch")
        try:
            state = state_from_dict(orjson.loads(text))
        except (ValueError, KeyError, TypeError) as error:
            raise LogCorrupted(seq, f"snapshot cannot be read ({error})") from error
        if state.last_seq != seq:
            raise LogCorrupted(seq, f"snapshot holds the state of seq {state.last_seq}")
        return Snapshot(seq, ts, state, event_hash)

    def latest_snapshot(self, max_seq: int | None = None) -> Snapshot | None:
        """The newest intact snapshot at or before `max_seq`; damaged ones are passed over."""
        limit = max_seq if max_seq is not None else self.head().seq
        for seq in reversed(self.snapshot_seqs()):
            if seq > limit:
                continue
            try:
                return self.snapshot(seq)
            except LogCorrupted:
                continue
        return None

    def known_orders(self, order_ids: Iterable[str]) -> dict[str, str]:
        """The digest recorded for each of `order_ids` that was ever accepted (the idempotency
        record; ids never accepted are left out): one indexed query per few hundred ids."""
        ids = list(dict.fromkeys(order_ids))
        known: dict[str, str] = {}
        try:
            for start in range(0, len(ids), _MAX_IDS_PER_QUERY):
                chunk = ids[start : start + _MAX_IDS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT order_id, digest FROM orders WHERE order_id IN ({marks})"
                known.update(self._db.execute(query, chunk))
        except sqlite3.Error as error:
            raise LogError(f"cannot read the log: {error}") from error
        return known

    def order_record(self, order_id: str) -> OrderRecord | None:
        """What the idempotency record holds about `order_id` (None: never accepted)."""
        try:
            row = self._db.execute(
                "SELECT digest, outcome, outcome_seq FROM orders WHERE order_id = ?", (order_id,)
            ).fetchone()
        except sqlite3.Error as error:
            raise LogError(f"cannot read the log: {error}") from error
        return None if row is None else OrderRecord(*row)

    def migrations(self) -> list[str]:
        return [name for (name,) in self._db.execute("SELECT name FROM schema_migrations ORDER BY name")]

    # -- which releases wrote it ---------------------------------------------------

    def writers(self) -> dict[str, str]:
        """Every release that wrote to this log (from 0.2.0 on) -> the formats it writes (JSON)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'writers'").fetchone():
            return {}  # a log no agent has opened since before the table (read-only here)
        return dict(self._db.execute("SELECT release, formats FROM writers"))

    def releases_started(self) -> list[str]:
        """The releases named by the stored AgentStarted events, oldest first (a full scan)."""
        rows = self._db.execute(
            "SELECT json_extract(data, '$.version') FROM events WHERE type = ? GROUP BY 1 ORDER BY min(seq)",
            (AgentStarted.__name__,),
        )
        return [str(release) for (release,) in rows]

    def payload_versions(self) -> dict[str, dict[int, int]]:
        """Per stored event type, how many events of each payload version (a full scan)."""
        found: dict[str, dict[int, int]] = {}
        rows = self._db.execute(
            f"SELECT type, coalesce(json_extract(data, '$.{PAYLOAD_VERSION}'), 1), count(*) FROM events GROUP BY 1, 2"
        )
        for type_, version, count in rows:
            found.setdefault(type_, {})[int(version)] = int(count)
        return found

    def snapshot_formats(self) -> dict[int, int]:
        """Per snapshot format, how many stored snapshots have it."""
        rows = self._db.execute(
            f"SELECT coalesce(json_extract(state, '$.{SNAPSHOT_FORMAT_KEY}'), 1), count(*) FROM snapshots GROUP BY 1"
        )
        return {int(version): int(count) for version, count in rows}

    def record_writer(self, release: str, formats: str) -> None:
        """Record that `release`, which writes `formats`, writes to this log."""
        now = iso(self._clock.now())
        with self.transaction():
            self._db.execute(
                "INSERT INTO writers (release, formats, first_at, last_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (release) DO UPDATE SET formats = excluded.formats, last_at = excluded.last_at",
                (release, formats, now, now),
            )

    # -- compaction --------------------------------------------------------------

    def cut(self, seq: int, archive: str | None) -> int:
        """Remove events up to `seq` (a snapshot's seq) and older snapshots; the
        log then starts after `seq`. Returns how many events were removed.

        In slices (`cut_slice`), each its own short transaction, then the freed
        pages are given back and the WAL emptied: for a process that holds the
        log alone (`log compact`); the agent runs the slices itself, between commits."""
        removed = 0
        while self.base().seq < seq:
            removed += self.cut_slice(seq, archive)
        self.vacuum()
        self.checkpoint()
        return removed

    def cut_slice(self, seq: int, archive: str | None, max_events: int = CUT_SLICE_EVENTS) -> int:
        """One step of a cut towards `seq` (a snapshot's seq): the base moves to the newest
        snapshot within `max_events` of it (or to the next snapshot, if none is that close),
        and the events and snapshots before it go, in one transaction. The base is a
        snapshot after every step, so a process that dies between two leaves a log that is
        whole (it verifies and starts as after any compaction). Returns the events removed."""
        with self.transaction():
            base = self.base()
            if seq <= base.seq:
                return 0
            if self._db.execute("SELECT 1 FROM snapshots WHERE seq = ?", (seq,)).fetchone() is None:
                raise LogError(f"no snapshot at seq {seq} to cut the log at")
            (step,) = self._db.execute(
                "SELECT coalesce(max(seq), (SELECT min(seq) FROM snapshots WHERE seq > ?)) "
                "FROM snapshots WHERE seq > ? AND seq <= ?",
                (base.seq, base.seq, min(seq, base.seq + max_events)),
            ).fetchone()
            row = self._db.execute("SELECT hash FROM events WHERE seq = ?", (step,)).fetchone()
            if row is None:
                raise LogError(f"no event {step} to cut the log at")
            removed = self._db.execute("DELETE FROM events WHERE seq <= ?", (step,)).rowcount
            self._db.execute("DELETE FROM snapshots WHERE seq < ?", (step,))
            self._db.execute(
                "INSERT OR REPLACE INTO log_base (id, seq, hash, archive) VALUES (1, ?, ?, ?)", (step, row[0], archive)
            )
        return int(removed)

    def vacuum(self, pages: int | None = None) -> int:
        """Give back to the file system up to `pages` free pages (all: None), if the log was
        made to (auto_vacuum incremental, since logs were created so); the free pages left."""
        self._db.execute("PRAGMA incremental_vacuum" if pages is None else f"PRAGMA incremental_vacuum({int(pages)})")
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        return int(free)

    def checkpoint(self, *, wait: bool = True) -> bool:
        """Copy the WAL into the file and empty it (`wal_checkpoint(TRUNCATE)`); whether it
        could. Without `wait`, a reader in the middle of a read makes it give up at once
        instead of waiting for it (up to the busy timeout), so the caller is never held."""
        (timeout,) = self._db.execute("PRAGMA busy_timeout").fetchone()
        if not wait:
            self._db.execute("PRAGMA busy_timeout = 0")
        try:
            (busy, _, _) = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout)}")
        return not busy

    def used_bytes(self) -> int:
        """The bytes of the log's pages in use (its file, less the free pages it may reuse)."""
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        (size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int((pages - free) * size)

    def last_seq_older_than(self, ts: str) -> int:
        """The last seq of the events stamped at or before `ts`, counted from the start: the
        first event after `ts` ends them. Reads from the oldest on, so it costs in proportion
        to the old events, not to the log (`last_seq_until` reads it all)."""
        row = self._db.execute("SELECT seq FROM events WHERE ts > ? ORDER BY seq LIMIT 1", (ts,)).fetchone()
        return int(row[0]) - 1 if row is not None else self.head().seq

    def sizes(self) -> tuple[int, int]:
        """The bytes of the log's file and of its WAL, as they are on disk now."""
        return _size(self.path), _size(self.path.with_name(self.path.name + "-wal"))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def connect_sqlite3(path: Path) -> sqlite3.Connection:
    """The writer's connection through the standard library, in autocommit mode."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


_COLUMNS = 6
_MAX_ROWS_PER_INSERT = 128  # 768 parameters: below SQLite's oldest limit of 999


@cache
def _insert_sql(rows: int) -> str:
    return "INSERT INTO events (seq, ts, type, subject, data, hash) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?)"] * rows)


def _insert(db: sqlite3.Connection, values: list[object]) -> None:
    """Insert rows given as one flat list of their columns. A statement of many rows is
    about a third cheaper per row than `executemany`, which steps the statement once per
    row; statements of 128, 64, 32 ... rows keep the statements (and SQLite's statement
    cache) few whatever the batch size."""
    rows = len(values) // _COLUMNS
    start = 0
    while start < rows:
        size = min(_MAX_ROWS_PER_INSERT, 1 << ((rows - start).bit_length() - 1))
        db.execute(_insert_sql(size), values[start * _COLUMNS : (start + size) * _COLUMNS])
        start += size


def _outcome(event: InventoryIssued | OrderFailed | OrderCancelled) -> str:
    if isinstance(event, InventoryIssued):
        return event.inventory_id
    return FAILED if isinstance(event, OrderFailed) else CANCELLED


def _checksum(text: str) -> str:
    return sha256(text.encode()).hexdigest()


__all__ = [
    "APPLICATION_ID",
    "GENESIS_HASH",
    "MIGRATIONS",
    "OUTBOX_CURSOR",
    "Base",
    "Connect",
    "EventLog",
    "OrderRecord",
    "Row",
    "Snapshot",
    "Synchronous",
    "chain_hash",
    "connect_sqlite3",
]
