"""Reading an archive that `log compact` wrote: gzip-compressed JSON lines, one event
each with its hash (`row_json(row, with_hash=True)`).

An archive holds events only (no snapshots, no idempotency record), so it can be
shown and its chain checked, but nothing else: the chain is checked within it,
from its first event, whose own link to the event before it needs that event
(unless it is the log's first, chained to the genesis hash).
"""

from __future__ import annotations

import gzip
import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson

from edge_agent.errors import LogCorrupted, LogError
from edge_agent.log.journal import checked
from edge_agent.log.store import GENESIS_HASH, Row

_GZIP_MAGIC = b"\x1f\x8b"
_T = TypeVar("_T")
ONLY_SHOW_OR_VERIFY = "an archive holds events only; use log show or log verify"


def is_archive(path: Path) -> bool:
    """Whether `path` is gzip-compressed (whatever its name): the only thing it can then be is an archive."""
    try:
        with open(path, "rb") as stream:
            return stream.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    except OSError:
        return False  # whoever opens it next says why it cannot be read


def rows(path: Path) -> Iterator[Row]:
    """The archive's events, as a log stores them: `data` is encoded again from its JSON,
    which gives back the text its hash was computed over (the log's encoding is compact)."""
    try:
        with gzip.open(path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                yield _row(line, path, number)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise LogError(f"cannot read the archive {path}: {error} (the file is damaged)") from error


def _row(line: bytes, path: Path, number: int) -> Row:
    try:
        record = orjson.loads(line)
        return Row(
            seq=_field(record, "seq", int),
            ts=_field(record, "ts", str),
            type=_field(record, "type", str),
            subject=_field(record, "subject", str),
            data=orjson.dumps(record["data"]).decode(),
            hash=_field(record, "hash", str),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError) as error:
        raise LogError(f"{path}, line {number}: not an archived event") from error


def _field(record: dict[str, object], name: str, kind: type[_T]) -> _T:
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(name)
    return value


@dataclass(frozen=True, slots=True)
class ArchiveVerdict:
    """What `verify` found in an archive: `fault` is None when its events are intact."""

    first_seq: int | None  # None: no event
    last_seq: int | None
    events: int
    fault: LogCorrupted | None

    @property
    def first_link_checked(self) -> bool:
        """Whether the first event's hash was checked too: only the log's first event
        chains to a hash known without the event before it."""
        return self.first_seq == 1


def verify(path: Path) -> ArchiveVerdict:
    """Check seq continuity and the hash chain within the archive; stops at the first fault."""
    first_seq = last_seq = None
    events = 0
    try:
        stream = rows(path)
        first = next(stream, None)
        if first is None:
            return ArchiveVerdict(None, None, 0, None)
        first_seq = first.seq
        if first.seq == 1:
            chain = checked(itertools.chain([first], stream), 0, GENESIS_HASH)
        else:  # taken on trust: the event it chains to is not here
            chain = itertools.chain([first], checked(stream, first.seq, first.hash))
        for row in chain:
            last_seq = row.seq
            events += 1
    except LogCorrupted as fault:
        return ArchiveVerdict(first_seq, last_seq, events, fault)
    except LogError as error:  # a damaged file, or a line that is no event
        at = 1 if last_seq is None else last_seq + 1
        return ArchiveVerdict(first_seq, last_seq, events, LogCorrupted(at, str(error)))
    return ArchiveVerdict(first_seq, last_seq, events, None)
