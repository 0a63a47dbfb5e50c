"""Readers in other processes see a consistent prefix of the log and never block the writer.

This test process is the writer (a `Journal`, as in the agent); the readers are
child processes running tests/support/log_reader.py, each opening the file read-only as
the CLI does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.clock import FakeClock
from edge_agent.log.journal import Journal, checked
from edge_agent.log.store import GENESIS_HASH, EventLog
from tests.support import ROOT
from tests.support.agents import next_line
from tests.support.plant import produce

ROUNDS = 30  # the writer's rounds in the follow test: ~100 events each
HELD_LOG_EVENTS = 6000  # more than `EventLog.rows` fetches at once (5000), so the held cursor is mid-read


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """The writer: a journal on a fresh log (fsync per commit is not what is tested here)."""
    with Journal.open(tmp_path / "events.db", synchronous="normal", snapshot_every=100, clock=FakeClock()) as j:
        yield j


def start_reader(children: list[subprocess.Popen[str]], mode: str, path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.log_reader", mode, str(path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    return proc


def tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def report_of(words: list[str]) -> dict[str, Any]:
    assert words[0] == "report", words
    report: dict[str, Any] = json.loads(" ".join(words[1:]))
    return report


def hashes(journal: Journal) -> dict[int, str]:
    """seq -> hash of every event, as the writer committed them (0 -> the genesis hash)."""
    return {0: GENESIS_HASH, **{row.seq: row.hash for row in journal.log.rows()}}


def read_until(reader: subprocess.Popen[str], seen: list[tuple[int, str]], length: int | None) -> dict[str, Any]:
    """Collect the reader's `saw N HASH` lines until it has seen `length` events
    (returns {}) or, with `length` None, until its report (returned)."""
    while True:
        words = next_line(reader, "reader").split()
        if words[0] != "saw":
            assert length is None, words
            return report_of(words)
        seen.append((int(words[1]), words[2]))
        if int(words[1]) == length:
            return {}


@pytest.mark.slow
def test_reader_process_sees_consistent_growing_prefixes_while_writer_appends(
    journal: Journal, children: list[subprocess.Popen[str]]
) -> None:
    clock = FakeClock()
    produce(journal, 5, clock=clock, prefix="start-")
    reader = start_reader(children, "follow", journal.log.path)
    seen: list[tuple[int, str]] = []
    read_until(reader, seen, journal.state.last_seq)  # the reader is reading before the writer goes on

    for round_ in range(ROUNDS):
        produce(journal, 10, clock=clock, prefix=f"r{round_}-")  # ~100 events, in commits of 1 to 3
        read_until(reader, seen, journal.state.last_seq)  # it read while they were appended
    head = journal.state.last_seq
    tell(reader, f"stop {head}")
    report = read_until(reader, seen, None)
    assert reader.wait(timeout=60) == 0

    print(f"{report['reads']} reads, {len(report['lengths'])} lengths seen, final seq {head}")
    assert head > 3000
    assert report["errors"] == [], "a read failed ('database is locked'?) or was not a consistent prefix"
    lengths = report["lengths"]
    assert lengths == [n for n, _ in seen]
    assert report["reads"] >= len(lengths) > ROUNDS, f"the reader did not see the log grow: {lengths}"
    assert lengths == sorted(lengths)
    assert lengths[-1] == head
    committed = hashes(journal)
    for n, chain_hash in seen:  # every read ended on a hash the writer committed: a true prefix
        assert committed[n] == chain_hash, f"the read of {n} events is not a prefix of the log"


@pytest.mark.slow
def test_long_read_transaction_in_another_process_does_not_block_the_writer(
    journal: Journal, children: list[subprocess.Popen[str]]
) -> None:
    clock = FakeClock()
    produce(journal, HELD_LOG_EVENTS // 10 + 1, clock=clock, prefix="old-")
    held_head = journal.state.last_seq
    assert held_head > HELD_LOG_EVENTS
    reader = start_reader(children, "hold", journal.log.path)
    assert next_line(reader, "reader").split() == ["holding", "1"]  # its read transaction is open, its cursor mid-way

    # Enough commits for the WAL to pass the automatic checkpoint threshold (1000 pages)
    # while the snapshot is held: checkpoints must not wait for the reader either.
    # Every append would fail with "database is locked" (busy_timeout is 5 s) if it waited.
    commits = 0
    while journal.state.last_seq < held_head + 3000:
        produce(journal, 10, clock=clock, prefix=f"new{commits}-")
        commits += 1
    new_head = journal.state.last_seq
    wal = journal.log.path.with_name(journal.log.path.name + "-wal")
    print(f"held at seq {held_head}; the writer reached {new_head} in {commits} rounds; WAL {wal.stat().st_size} bytes")
    with EventLog(journal.log.path, readonly=True) as fresh:  # a new reader sees the new events
        assert fresh.head().seq == new_head
        assert [row.seq for row in checked(fresh.rows(), 0, GENESIS_HASH)][-1] == new_head

    tell(reader, "go")
    report = read_until(reader, [], None)
    assert reader.wait(timeout=60) == 0
    # The held read saw exactly the log as it was when it began, chain intact.
    assert report == {"count": held_head, "last_seq": held_head, "last_hash": hashes(journal)[held_head]}
