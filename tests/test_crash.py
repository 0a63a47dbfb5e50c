"""Crash safety of the log: a writer killed with SIGKILL at random moments.

A child process (tests/support/crash_writer.py) appends real order lifecycles to one
database file and acknowledges every commit on stdout. The test reads a random
number of acknowledgements, kills the child at once (so the kill lands anywhere
in the commit that follows), checks the file, and starts the next child on the
same file, so the log keeps growing across the kills.

The run is reproducible up to timing: the seed is printed, and setting
EDGE_AGENT_CRASH_SEED replays the same choices.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.domain.codec import state_to_dict
from edge_agent.domain.events import BuildComplete, InventoryIssued, Recorded, ShipmentArrived, UnitBuilt
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.log.journal import Journal
from edge_agent.log.store import EventLog, Row
from edge_agent.log.verify import verify
from tests.support import ROOT
from tests.support.agents import next_line
from tests.support.crash_writer import SNAPSHOT_EVERY, digest

KILLS = 60
MAX_ACKS = 40  # commits acknowledged before a kill: 0..MAX_ACKS, at random


@dataclass
class Recovered:
    """What the log holds after a kill, as the next child must find it."""

    head: int
    digest: str


@dataclass
class Stats:
    kills: int = 0
    acknowledged: int = 0
    unacknowledged_commits: int = 0  # kills that landed after a commit but before its acknowledgement
    heads: list[int] = field(default_factory=list)


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("EDGE_AGENT_CRASH_SEED") or random.randrange(2**32))
    print(f"crash test seed: {value} (set EDGE_AGENT_CRASH_SEED={value} to replay it)")
    return value


def spawn(path: Path, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.crash_writer", str(path), str(seed)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def acknowledged(line: str) -> tuple[int, int]:
    """The (first, last) seqs of one commit the child acknowledged."""
    first, last = line.split()
    return int(first), int(last)


def full_replay(records: list[Recorded]) -> State:
    """The state from seq 1, snapshots ignored."""
    return fold(State(), records)


def assert_batches_whole(rows: list[Row], records: list[Recorded]) -> None:
    """The events one decision yields were committed together or not at all."""
    for i, record in enumerate(records):
        event = record.event
        if isinstance(event, ShipmentArrived):
            assert i + 1 < len(records), f"seq {record.seq}: ShipmentArrived without its InventoryIssued"
            nxt = records[i + 1].event
            assert isinstance(nxt, InventoryIssued), f"seq {record.seq}: ShipmentArrived followed by {nxt}"
            assert nxt.order_id == event.order_id
            assert rows[i + 1].ts == rows[i].ts, f"seq {record.seq}: arrival and issue in different commits"
        if isinstance(event, InventoryIssued):
            prev = records[i - 1].event if i else None
            assert isinstance(prev, ShipmentArrived), f"seq {record.seq}: InventoryIssued without ShipmentArrived"
            assert prev.order_id == event.order_id
        if isinstance(event, BuildComplete):
            prev = records[i - 1].event if i else None
            assert isinstance(prev, UnitBuilt), f"seq {record.seq}: BuildComplete without its UnitBuilt"
            assert prev.order_id == event.order_id
            assert rows[i - 1].ts == rows[i].ts, f"seq {record.seq}: last unit and completion in different commits"


def check_log(path: Path, batches: list[tuple[int, int]], acked: int) -> Recovered:
    """Everything that must hold of the file after a kill; returns what recovery must give."""
    with EventLog(path, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None, f"verify found a fault: {verdict.fault}"

        rows = list(log_.rows())
        head = log_.head().seq
        assert log_.count() == head == len(rows), "seqs have a gap"
        assert [row.seq for row in rows] == list(range(1, head + 1)), "seqs are not 1, 2, 3 ..."
        assert head >= acked, f"acknowledged commits lost: the child acknowledged seq {acked}, the log ends at {head}"

        records = [row.decode() for row in rows]  # every row decodes: no partial event
        assert_batches_whole(rows, records)
        for first, last in batches:  # each acknowledged append is one commit, whole
            assert len({row.ts for row in rows[first - 1 : last]}) == 1, f"commit {first}..{last} is split"

        replayed = full_replay(records)
        assert replayed.last_seq == head
        # Recovery through the writer's own path (newest snapshot + the tail), with the
        # read-only connection still open, so the file stays as the kill left it.
        with Journal.open(path, snapshot_every=SNAPSHOT_EVERY) as journal:
            assert journal.state.last_seq == head
            assert state_to_dict(journal.state) == state_to_dict(replayed), "recovered state differs from replay"
        return Recovered(head, digest(replayed))


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_event(
    tmp_path: Path, seed: int, children: list[subprocess.Popen[str]]
) -> None:
    rng = random.Random(seed)
    path = tmp_path / "events.db"
    expected: Recovered | None = None
    stats = Stats()

    for kill in range(KILLS):
        proc = spawn(path, rng.randrange(2**32))
        children.append(proc)
        word, seq, state_digest = next_line(proc, "writer on its own").split()
        assert word == "ready"
        if expected is not None:  # the child's own recovery, on the file exactly as the kill left it
            assert (int(seq), state_digest) == (expected.head, expected.digest), f"kill {kill}: bad recovery"

        batches = [acknowledged(next_line(proc, "writer on its own")) for _ in range(rng.randint(0, MAX_ACKS))]
        proc.kill()  # at once: somewhere inside the next commit, or between two
        if proc.wait() != -signal.SIGKILL:
            stderr = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"kill {kill}: the writer exited on its own (exit {proc.returncode}):\n{stderr}")
        assert proc.stdout is not None
        # Lines already written before the kill are acknowledgements too.
        batches += [acknowledged(line) for line in proc.stdout.read().splitlines(keepends=True) if line.endswith("\n")]
        acked = batches[-1][1] if batches else int(seq)

        expected = check_log(path, batches, acked)
        stats.kills += 1
        stats.acknowledged += len(batches)
        stats.unacknowledged_commits += expected.head > acked
        stats.heads.append(expected.head)

    print(f"{stats.kills} kills, {stats.acknowledged} acknowledged commits, final seq {stats.heads[-1]},")
    print(f"{stats.unacknowledged_commits} kills found a commit the writer had not acknowledged yet")
    assert stats.kills >= 50
    assert stats.heads == sorted(stats.heads), "the log shrank"
    assert stats.heads[-1] > stats.heads[0], "the log did not keep growing"
