"""Power cuts, not process kills: a disk whose writes stay in memory until fsync.

A killed process leaves its writes in the OS page cache, so they all reach the disk;
a power cut loses whatever was written since the last fsync, or tears it. `Power`
models that for one run of the log: an apsw VFS (apsw bundles its own SQLite, the
same file format as the standard library's) holds each file's writes since its last
xSync in memory (reads see them, as they would the page cache) and writes them to
the real file only at xSync. After a chosen number of I/O operations the power goes
out: each file keeps a random prefix of the 4 KiB pieces of its unsynced writes
(none, some: a torn write, or all), every later write or sync raises `PowerCut`,
and what is left in the real files is exactly what the disk would hold. Another
connection (the standard library's, another process) then takes over those files.

`Power.connect` is an `EventLog` connection factory: the real log code runs on it
through `ApswConnection`, the part of `sqlite3.Connection` the log uses, on apsw.
`Power.files` gives `write_atomically` the same cut for plain files: a file not
fsynced keeps a prefix of its pieces, and a rename not followed by an fsync of its
folder may be undone. Simplifications, each on the side SQLite and `write_atomically`
do not rely on: creating and deleting a file take effect at once (SQLite deletes a
WAL only once the database holds all of it), a plain file is known from its first
fsync or rename, and a rename over an existing file, undone, does not bring that
file back.
"""

# ruff: noqa: N802 (the VFS methods have SQLite's names: xOpen, xRead, ...)
from __future__ import annotations

import itertools
import os
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import apsw

from edge_agent.files import FileSystem, fsync_dir
from edge_agent.log.store import Connect

PIECE = 4096  # what the disk writes at once: a torn write keeps whole pieces
_MAIN_OR_WAL = apsw.SQLITE_OPEN_MAIN_DB | apsw.SQLITE_OPEN_WAL
_names = itertools.count()
_T = TypeVar("_T")


class PowerCut(Exception):
    """The power went out: every write or sync from then on raises this."""


@dataclass
class _Volatile:
    """One file as the OS shows it (`image`) and what was written to it since its last
    fsync: (offset, bytes) for a write, (size, None) for a truncation."""

    image: bytearray
    pending: list[tuple[int, bytes | None]] = field(default_factory=list)


class Power:
    """The supply of one run: cut after `cut_after` writes, truncations and syncs (of the
    log's files and of files written through `files`), or never (None)."""

    def __init__(self, rng: random.Random, cut_after: int | None = None) -> None:
        self._rng = rng
        self._left = cut_after
        self.cut = False
        self.operations = 0  # counted so far: a run without a cut tells how many there are to cut at
        self._files: dict[str, _Volatile] = {}
        self._plain: dict[Path, bool] = {}  # plain files written since the cut could tear them: fsynced?
        self._renames: list[tuple[Path, Path]] = []  # renames since the last folder fsync
        self.vfs_name = f"powercut-{next(_names)}"
        self._vfs = _Vfs(self)

    def connect(self, path: Path) -> sqlite3.Connection:
        """An `EventLog` connection factory: the log's files through this supply."""
        return ApswConnection(path, self.vfs_name)

    def close(self) -> None:
        """Unregister the VFS (after every connection through it is closed)."""
        self._vfs.unregister()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the clock of the cut --------------------------------------------------

    def operation(self) -> None:
        """Count one write, truncation or sync about to happen; the cut may land before it."""
        if self.cut:
            raise PowerCut("the power is off")
        self.operations += 1
        if self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self._lose_unsynced()
                raise PowerCut(f"power cut before I/O operation {self.operations}")

    def cut_now(self) -> None:
        """Cut the power now, between two operations (an idle moment is a moment too)."""
        if not self.cut:
            self._lose_unsynced()

    def _lose_unsynced(self) -> None:
        self.cut = True
        for name, volatile in self._files.items():
            pieces = list(_pieces(volatile.pending))
            kept = self._rng.choice((0, self._rng.randint(0, len(pieces))))  # half lost, half a prefix (or all)
            _apply(name, pieces[:kept])
        for src, dst in reversed(self._renames):
            if self._rng.random() < 0.5:  # the folder was not fsynced since: the rename may not have landed
                dst.replace(src)
        for path, synced in self._plain.items():
            if not synced and path.exists():  # written, never fsynced: a prefix of its pieces at most
                size = path.stat().st_size
                os.truncate(path, self._rng.randint(0, size // PIECE) * PIECE)

    # -- the log's files (called by the VFS) -----------------------------------

    def volatile(self, name: str, load: Callable[[], bytes]) -> _Volatile:
        if name not in self._files:
            self._files[name] = _Volatile(bytearray(load()))
        return self._files[name]

    def sync(self, name: str) -> None:
        volatile = self._files[name]
        _apply(name, list(_pieces(volatile.pending)))
        volatile.pending.clear()

    def deleted(self, name: str) -> None:
        self._files.pop(name, None)

    # -- plain files (`write_atomically`) --------------------------------------

    def files(self) -> FileSystem:
        """`write_atomically`'s file operations, counted and cut like the log's."""

        def fsync(fd: int) -> None:
            path = Path(f"/proc/self/fd/{fd}").readlink()
            self._plain.setdefault(path, False)
            self.operation()
            os.fsync(fd)
            self._plain[path] = True

        def replace(src: Path, dst: Path) -> None:
            self._plain.setdefault(src, False)
            self.operation()
            src.replace(dst)
            self._plain[dst] = self._plain.pop(src)
            self._renames.append((src, dst))

        def sync_dir(folder: Path) -> None:
            self.operation()
            fsync_dir(folder)
            self._renames = [(src, dst) for src, dst in self._renames if src.parent != folder]

        return FileSystem(fsync=fsync, replace=replace, fsync_dir=sync_dir)


@contextmanager
def routing(path: Path, connect: Connect) -> Iterator[None]:
    """While the block runs, the log at `path`, opened for writing by code that makes its
    own connection (the `Agent`: it opens its log by `Journal.open`, which takes no
    connection factory), is opened by `connect`: the standard library's `sqlite3.connect`
    is routed for that one file (as `io_faults.faulty_disk` routes it to a failing disk).
    Read-only connections (by URI) and other files are left alone."""
    real_connect = sqlite3.connect
    target = path.resolve()

    def route(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        if isinstance(database, Path) and database.resolve() == target:
            return connect(database)
        db: sqlite3.Connection = real_connect(database, *args, **kwargs)
        return db

    sqlite3.connect = route  # type: ignore[assignment]  # the store calls sqlite3.connect
    try:
        yield
    finally:
        sqlite3.connect = real_connect


def _pieces(pending: Sequence[tuple[int, bytes | None]]) -> Iterator[tuple[int, bytes | None]]:
    """The unsynced operations in the order they were made, writes split at PIECE boundaries."""
    for offset, data in pending:
        if data is None:
            yield offset, None
            continue
        start = 0
        while start < len(data):
            end = min(len(data), (offset + start) // PIECE * PIECE + PIECE - offset)
            yield offset + start, data[start:end]
            start = end


def _apply(name: str, pieces: Sequence[tuple[int, bytes | None]]) -> None:
    """Make `pieces` what the real file holds (not fsynced: the model is the disk here)."""
    if not pieces:
        return
    fd = os.open(name, os.O_WRONLY)
    try:
        for offset, data in pieces:
            if data is None:
                os.ftruncate(fd, offset)
            else:
                os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


class _Vfs(apsw.VFS):
    def __init__(self, power: Power) -> None:
        self._power = power
        super().__init__(power.vfs_name, "")

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        if name is None or not flags[0] & _MAIN_OR_WAL:  # temporary files are not the log's
            return apsw.VFSFile("", name, flags)
        return _File(self._power, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        self._power.operation()
        self._power.deleted(filename)
        super().xDelete(filename, syncdir)


class _File(apsw.VFSFile):
    """The real file for locks and shared memory; its content through `Power`."""

    def __init__(self, power: Power, name: str | apsw.URIFilename, flags: list[int]) -> None:
        super().__init__("", name, flags)
        self._power = power
        self._name = name.filename() if isinstance(name, apsw.URIFilename) else name
        self._file = power.volatile(self._name, lambda: super(_File, self).xRead(super(_File, self).xFileSize(), 0))

    def xRead(self, amount: int, offset: int) -> bytes:
        return bytes(self._file.image[offset : offset + amount])  # short: SQLite zero-fills the rest

    def xFileSize(self) -> int:
        return len(self._file.image)

    def xWrite(self, data: bytes, offset: int) -> None:
        self._power.operation()
        image = self._file.image
        if len(image) < offset:
            image.extend(bytes(offset - len(image)))
        image[offset : offset + len(data)] = data
        self._file.pending.append((offset, bytes(data)))

    def xTruncate(self, newsize: int) -> None:
        self._power.operation()
        del self._file.image[newsize:]
        self._file.pending.append((newsize, None))

    def xSync(self, flags: int) -> None:
        self._power.operation()
        self._power.sync(self._name)


class ApswConnection(sqlite3.Connection):
    """What the event log uses of `sqlite3.Connection`, run by apsw (through the VFS
    `vfs`), its errors raised as `sqlite3.Error` as the log expects. The standard
    library's connection underneath is an empty in-memory one, never used."""

    def __init__(self, path: Path, vfs: str) -> None:
        super().__init__(":memory:", isolation_level=None, check_same_thread=False)
        self.apsw = _sqlite_errors(lambda: apsw.Connection(str(path), vfs=vfs))

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return _Cursor(self).execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        cursor = _Cursor(self)
        cursor.run(lambda: self.apsw.executemany(sql, parameters))
        return cursor

    @property
    def in_transaction(self) -> bool:
        return not self.apsw.get_autocommit()

    def close(self) -> None:
        try:
            _sqlite_errors(self.apsw.close)
        except BaseException:
            self.apsw.close(True)  # closed whatever failed (after a cut, its last checkpoint)
            raise
        finally:
            super().close()


class _Cursor(sqlite3.Cursor):
    def __init__(self, connection: ApswConnection) -> None:
        super().__init__(connection)
        self._connection = connection
        self._rows: Iterator[Any] = iter(())
        self._changes = -1

    def run(self, statement: Callable[[], apsw.Cursor]) -> None:
        self._rows = _sqlite_errors(statement)
        self._changes = self._connection.apsw.changes()

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        self.run(lambda: self._connection.apsw.execute(sql, parameters))
        return self

    @property
    def rowcount(self) -> int:
        return self._changes

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        return _sqlite_errors(lambda: next(self._rows))

    def fetchone(self) -> Any:
        return next(self, None)

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        return list(itertools.islice(self, size))

    def fetchall(self) -> list[Any]:
        return list(self)

    def close(self) -> None:
        self._rows = iter(())
        super().close()


def _sqlite_errors(call: Callable[[], _T]) -> _T:
    try:
        return call()
    except apsw.Error as error:
        raise sqlite3.OperationalError(str(error)) from error
