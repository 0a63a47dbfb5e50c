"""One writer per data folder: an exclusive `flock` on `{data_dir}/lock`.

Two agents on one `events.db` would interleave their appends and break the chain,
so the agent (and `log compact`) holds this lock while it may write. `flock` is
released by the kernel whatever way the holder dies, so `kill -9` or a power cut
never leaves a stale lock behind. The holder writes its pid and start time into
the file, so that the refusal and `status` can name it.

Readers never take the lock for longer than a probe (`holder`): a starting agent
retries its own attempt for a moment, so a `status` run at that instant cannot
make it fail.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from edge_agent.domain.moments import iso
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.files import FILE_MODE, private_dir

LOCK_NAME = "lock"
RETRY_S = 0.5  # how long a taker retries while a reader's probe may hold the lock
_RETRY_STEP_S = 0.02


class DataDirLocked(EdgeAgentError):
    """Another process (the running agent) holds the data folder's lock."""

    exit_code = 2

    def __init__(self, data_dir: Path, holder: Holder | None, advice: str = "") -> None:
        who = f"pid {holder.pid}" if holder is not None and holder.pid is not None else "pid unknown"
        super().__init__(f"another edge-agent ({who}) is running on {data_dir}{advice}")
        self.data_dir = data_dir
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as it wrote itself into the file (None where unreadable)."""

    pid: int | None
    since: str | None  # ISO 8601 UTC, when it took the lock


class DataDirLock:
    """`with DataDirLock(data_dir):` holds the data folder's lock (DataDirLocked if taken)."""

    def __init__(self, data_dir: Path, *, advice: str = "", key: str = "data_dir") -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_NAME
        self._advice = advice
        self._key = key  # what to blame when the folder cannot be used
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ConfigError(f"{self._key}: cannot use {self.data_dir}: it is a file, not a folder", key=self._key)
        try:
            private_dir(self.data_dir)
            # O_NOFOLLOW: a symlink planted at the lock's name must not redirect the write below.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as error:  # the first thing the agent does: a config error, nothing touched
            reason = error.strerror or str(error)
            raise ConfigError(f"{self._key}: cannot use {self.data_dir}: {reason}", key=self._key) from error
        try:
            os.fchmod(fd, FILE_MODE)  # os.open's mode is filtered by the umask
            _lock(fd)
        except BlockingIOError:
            os.close(fd)
            raise DataDirLocked(self.data_dir, holder(self.data_dir), self._advice) from None
        except BaseException:
            os.close(fd)
            raise
        text = f"{os.getpid()}\n{iso(datetime.now(UTC))}\n".encode()
        os.pwrite(fd, text, 0)
        os.ftruncate(fd, len(text))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _lock(fd: int) -> None:
    """LOCK_EX without blocking, retried for RETRY_S: a reader's probe holds it only briefly."""
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(_RETRY_STEP_S)  # flock offers nothing to wait on with a deadline


def holder(data_dir: Path) -> Holder | None:
    """The process holding `data_dir`'s lock, or None if nobody does. Never creates the file,
    never blocks; the shared lock of the probe lasts a few microseconds."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> Holder:
    lines = os.pread(fd, 256, 0).decode("ascii", "replace").split()
    pid = int(lines[0]) if lines and lines[0].isdigit() else None
    since = lines[1] if len(lines) > 1 else None
    return Holder(pid, since)
