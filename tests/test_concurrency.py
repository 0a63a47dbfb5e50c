"""Readers in other processes see a consistent prefix of the log and never block the writer.

This test process is the writer (a `Journal`, as in the agent); the readers are
child processes running tests/log_reader.py, each opening the file read-only as
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
from tests.plant import produce

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 30  # the writer's rounds in the follow test: ~100 events each
HELD_LOG_EVENTS = 6000  # more than `EventLog.rows` fetches at once (5000), so the held cursor is mid-read


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    """The writer: a journal on a fresh log (fsync per commit is not what is tested here)."""
    with Journal.open(tmp_path / "events.db", synchronous="normal", snapshot_every=100, clock=FakeClock()) as j:
        yield j


@pytest.fixture
def readers() -> Iterator[list[subprocess.Popen[str]]]:
    """The reader processes started by a test; none outlives it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def start_reader(readers: list[subprocess.Popen[str]], mode: str, path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.log_reader", mode, str(path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    readers.append(proc)
    return proc


def next_line(proc: subprocess.Popen[str]) -> list[str]:
    """The reader's next line, split; fails the test (with its stderr) if it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.endswith("\n"):
        proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"the reader stopped (exit {proc.returncode}):\n{stderr}")
    return line.split()


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


@pytest.mark.slow
def test_reader_process_sees_consistent_growing_prefixes_while_writer_appends(
    journal: Journal, readers: list[subprocess.Popen[str]]
) -> None:
    clock = FakeClock()
    produce(journal, 5, clock=clock, prefix="start-")
    reader = start_reader(readers, "follow", journal.log.path)
    seen: list[tuple[int, str]] = []

    def wait_until_reader_sees(length: int) -> None:
        while True:
            word, n, chain_hash = next_line(reader)
            assert word == "saw"
            seen.append((int(n), chain_hash))
            if int(n) == length:
                return

    wait_until_reader_sees(journal.state.last_seq)  # the reader is running before the writer goes on
    for round_ in range(ROUNDS):
        produce(journal, 10, clock=clock, prefix=f"r{round_}-")  # ~100 events in commits of 1 to 3
        wait_until_reader_sees(journal.state.last_seq)
    head = journal.state.last_seq
    tell(reader, f"stop {head}")
    *rest, last = [next_line(reader) for _ in iter(lambda: reader.poll() is None or reader.stdout.peek(), False)]  # type: ignore[union-attr]
    report = report_of(last)
    assert reader.wait(timeout=60) == 0

    assert head > 3000
    assert report["errors"] == [], "a read failed or was inconsistent (never 'database is locked')"
    assert report["reads"] >= ROUNDS
    assert len(report["lengths"]) > ROUNDS, f"the reader did not see the log grow: {report['lengths']}"
    assert report["lengths"] == sorted(report["lengths"]) and report["lengths"][-1] == head
    assert [int(n) for n in report["lengths"]] == [n for n, _ in seen] + [int(w[1]) for w in rest]
    committed = hashes(journal)
    for n, chain_hash in seen:  # every read was a prefix of what the writer committed
        assert committed[n] == chain_hash, f"the read of {n} events is not a prefix of the log"
