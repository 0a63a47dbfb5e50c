"""Files the agent and the CLI create: private whatever the umask, written whole or not at all.

The log, its archives and exports hold every order a plant took, so they are made
readable by the owner and its group only (folders 0750, files 0640), and any file
written for the user appears complete under its name or not at all: written to a
temporary file in the target folder, fsynced, renamed into place, and the folder
fsynced so that the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edge_agent.errors import ConfigError

DIR_MODE = 0o750
FILE_MODE = 0o640


def private_dir(path: Path) -> Path:
    """`path` and any missing parents, created 0750 (an existing folder is left as it is)."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(mode=DIR_MODE, exist_ok=True)
        created.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0640 if it does not exist (never through a symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)  # os.open's mode is filtered by the umask
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class FileSystem:
    """The steps that make a written file durable, in the order `write_atomically` takes
    them; injectable so that the power-cut tests can cut the power between them."""

    fsync: Callable[[int], None] = os.fsync
    replace: Callable[[Path, Path], object] = Path.replace
    fsync_dir: Callable[[Path], None] = fsync_dir


OS_FILES = FileSystem()


def write_atomically(
    path: Path,
    write: Callable[[BinaryIO], None],
    *,
    force: bool = False,
    option: str = "--output",
    protected: tuple[Path, ...] = (),
    replaceable: Callable[[Path], str | None] = lambda path: None,
    files: FileSystem = OS_FILES,
) -> None:
    """Write a new file at `path` with `write(stream)`: complete under its name or not there.

    Refused (ConfigError, exit 2) before anything is written: a missing folder, a folder
    at `path`, an existing file without `force`, a symlink, or one of `protected` (the log
    being read, say). With `force`, an existing file is replaced (never written through)
    only if it is a regular file that `replaceable` finds nothing against (it returns what
    the file is, e.g. "an SQLite database", to refuse it): `--force` is for a file the
    command wrote before, never for a device, a lock or another program's data.
    `files`: how it is made durable (fsync, rename, folder fsync)."""
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{option}: folder {folder} does not exist", key=option)
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a folder; give a file name", key=option)
    target = path.resolve(strict=False) if not path.is_symlink() else path.absolute()
    for guarded in protected:
        if target == guarded.resolve() or (path.exists() and guarded.exists() and path.samefile(guarded)):
            raise ConfigError(f"{option}: {path} is the log being read; choose another file", key=option)
    if path.is_symlink():
        raise ConfigError(f"{option}: {path} is a symlink; not followed nor replaced", key=option)
    if path.exists():
        what = _kind(path) or replaceable(path)
        if what is not None:  # said with or without --force: --force would not do either
            refusal = f"{option}: {path} is {what}; --force replaces only a file this command wrote"
            raise ConfigError(refusal, key=option)
        if not force:
            raise ConfigError(f"{option}: {path} exists; use --force to replace it", key=option)
    temporary = folder / f".{path.name}.{os.getpid()}.partial"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            files.fsync(stream.fileno())
        files.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    files.fsync_dir(folder)


def _kind(path: Path) -> str | None:
    """What `path` is if not a regular file ("a device", ...); None for a regular file."""
    mode = path.lstat().st_mode
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"
