"""Retention by itself: the log kept within `log.max_mb` / `log.keep_days` in slices, never
past the outbox cursor; the WAL emptied when idle; the archives within their budget."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from edge_agent import service
from edge_agent.agent import Agent
from edge_agent.clock import FakeClock
from edge_agent.config import load_config
from edge_agent.domain.moments import iso
from edge_agent.errors import ConfigError
from edge_agent.gateway import Gateway
from edge_agent.health import HealthServer
from edge_agent.log.compact import Retention, compact, plan, write_archive
from edge_agent.log.journal import Journal, replay
from edge_agent.log.retention import Budget, Keeper
from edge_agent.log.store import OUTBOX_CURSOR, EventLog
from edge_agent.log.verify import verify
from tests.support import ROOT
from tests.support.agents import next_line, running
from tests.support.configs import agent_config, config_file
from tests.support.io_faults import Disk, faulty_disk
from tests.support.orders import order
from tests.support.plant import make_log, produce


def keeper(journal: Journal, budget: Budget, clock: FakeClock | None = None) -> Keeper:
    return Keeper(journal.log, budget, journal.log.path.parent / "archive", clock or FakeClock())


def tend(kept: Keeper) -> None:
    """One look at the log, as the agent's background task takes every second."""
    asyncio.run(kept.tend())


def archived(archive_dir: Path) -> list[dict[str, object]]:
    events = []
    for path in sorted(archive_dir.iterdir()):
        with gzip.open(path) as lines:
            events += [orjson.loads(line) for line in lines]
    return events


# -- the config ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_mb", "keep_days"])
def test_a_bound_that_retention_keep_cannot_honour_is_refused_naming_both_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(config_file(tmp_path, log={"retention": "keep", key: 2}))
    assert refused.value.key == f"log.{key}"
    assert f"log.{key}: needs log.retention archive or drop (log.retention: keep never removes" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_retention_keys_are_accepted_with_archive_or_drop(tmp_path: Path) -> None:
    path = config_file(tmp_path, log={"retention": "archive", "max_mb": 2, "keep_days": 30, "archive_max_mb": 50})
    bounds = load_config(path).log
    assert (bounds.max_mb, bounds.keep_days, bounds.archive_max_mb) == (2, 30, 50)
    with pytest.raises(ConfigError, match=r"log\.archive_max_mb"):
        load_config(config_file(tmp_path / "bad", log={"retention": "drop", "archive_max_mb": 0}))


# -- slices --------------------------------------------------------------------------


def test_a_cut_stopped_between_slices_leaves_a_whole_log_and_is_finished_without_archiving_twice(
    tmp_path: Path,
) -> None:
    db = make_log(tmp_path / "events.db", orders=40, snapshot_every=20)
    archive_dir = tmp_path / "archive"
    with EventLog(db) as log_:
        everything = [row.hash for row in log_.rows()]
        state = replay(log_)
        planned = plan(log_, Retention.archive, archive_dir)
        assert planned is not None
        assert planned.to_seq > 3 * 20  # several snapshot intervals to cut
        write_archive(log_, planned)
        removed = log_.cut_slice(planned.to_seq, str(planned.archive), max_events=25)
        # One slice: up to the newest snapshot within 25 events, no further; the process "dies" here.
        assert 20 <= removed <= 25
        assert log_.base().seq == removed
    with EventLog(db) as log_:
        assert verify(log_).fault is None
        assert replay(log_) == state
    with Journal.open(db) as journal:
        assert journal.state == state
    with EventLog(db) as log_:
        result = compact(log_, Retention.archive, archive_dir)  # finishes the cut that stopped
        assert result.up_to_seq == planned.to_seq
        assert result.removed == planned.to_seq - removed
        assert verify(log_).fault is None
        left = [row.hash for row in log_.rows()]
    assert [path.name for path in archive_dir.iterdir()] == [planned.archive.name]  # type: ignore[union-attr]
    assert [event["hash"] for event in archived(archive_dir)] + left == everything


@pytest.mark.slow
@pytest.mark.parametrize("slices", [1, 3, 6])
def test_a_compaction_killed_between_slices_leaves_a_whole_log_finished_by_the_next(
    tmp_path: Path, children: list[subprocess.Popen[str]], slices: int
) -> None:
    db = make_log(tmp_path / "events.db", orders=40, snapshot_every=20)
    with EventLog(db) as log_:
        everything = [row.hash for row in log_.rows()]
        state = replay(log_)
    compactor = subprocess.Popen(
        [sys.executable, "-m", "tests.support.crash_compactor", str(db)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(compactor)
    _, first, last = next_line(compactor, "compactor").split()
    for _ in range(slices):
        _, base = next_line(compactor, "compactor").split()
        assert compactor.stdin is not None
        compactor.stdin.write("\n")
        compactor.stdin.flush()
    _, base = next_line(compactor, "compactor").split()  # one more slice committed; then it waits
    compactor.kill()  # between two slices
    compactor.wait()
    assert 0 < int(base) < int(last)
    with EventLog(db) as log_:
        assert log_.base().seq == int(base)
        assert verify(log_).fault is None
        assert replay(log_) == state
    with Journal.open(db) as journal:
        assert journal.state == state
    with EventLog(db) as log_:
        result = compact(log_, Retention.archive, tmp_path / "archive")  # finishes the cut
        assert result.up_to_seq == int(last)
        left = [row.hash for row in log_.rows()]
    assert len(list((tmp_path / "archive").iterdir())) == 1  # not archived twice
    assert [event["hash"] for event in archived(tmp_path / "archive")] + left == everything
    assert int(first) == 1


# -- the background policy -----------------------------------------------------------


def test_past_max_mb_it_compacts_up_to_the_outbox_cursor_and_no_further(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.log.retention")
    with Journal.open(tmp_path / "events.db", snapshot_every=10) as journal:
        produce(journal, 30)
        head = journal.state.last_seq
        acknowledged = head // 2
        journal.log.save_cursor(OUTBOX_CURSOR, acknowledged)
        kept = keeper(journal, Budget(Retention.drop, max_mb=0.001))
        tend(kept)
        base = journal.log.base().seq
        assert base == max(seq for seq in journal.log.snapshot_seqs() if seq <= acknowledged)
        assert 0 < base <= acknowledged
        assert journal.log.count() == head - base
        assert kept.counts.compactions == 1
        assert kept.counts.events_removed == base
        assert f"log compacted (drop): events 1 to {base}, {base} removed" in caplog.text
        tend(kept)  # nothing more is acknowledged: nothing more goes
        assert journal.log.base().seq == base
        assert kept.counts.compactions == 1
        assert verify(journal.log).fault is None


def test_below_max_mb_nothing_is_compacted(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "events.db", snapshot_every=10) as journal:
        produce(journal, 30)
        journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
        tend(keeper(journal, Budget(Retention.drop, max_mb=100)))
        assert journal.log.base().seq == 0


def test_with_keep_days_only_events_older_than_that_go(tmp_path: Path) -> None:
    clock = FakeClock()
    with Journal.open(tmp_path / "events.db", snapshot_every=10, clock=clock) as journal:
        produce(journal, 20, clock=clock, prefix="old")
        last_old = journal.state.last_seq
        clock.advance(10 * 86400)
        produce(journal, 20, clock=clock, prefix="new")
        journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
        cutoff = iso(clock.now() - timedelta(days=5))
        kept = keeper(journal, Budget(Retention.archive, keep_days=5), clock)
        tend(kept)
        base = journal.log.base().seq
        assert base == max(seq for seq in journal.log.snapshot_seqs() if seq <= last_old)
        assert all(str(event["ts"]) < cutoff for event in archived(kept.archive_dir))
        assert next(row.seq for row in journal.log.rows() if row.ts >= cutoff) == last_old + 1
        assert verify(journal.log).fault is None


def test_archives_keep_to_their_budget_the_oldest_removed_first_each_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent.log.compact")
    with Journal.open(tmp_path / "events.db", snapshot_every=10) as journal:
        kept = keeper(journal, Budget(Retention.archive, max_mb=0.001))
        made = []
        for round_ in range(4):
            produce(journal, 10, prefix=f"r{round_}-")
            journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
            tend(kept)
            made += [p for p in sorted(kept.archive_dir.iterdir()) if p not in made]
        assert len(made) == 4
        sizes = [path.stat().st_size for path in made if path.exists()]
        assert len(sizes) == 4
        budget = Budget(Retention.archive, max_mb=0.001, archive_max_mb=(sizes[-1] + sizes[-2] + 1) / (1 << 20))
        tend(keeper(journal, budget))
    assert sorted(kept.archive_dir.iterdir()) == made[2:]
    for gone in made[:2]:
        assert f"archive {gone.name} removed" in caplog.text


# -- the WAL -------------------------------------------------------------------------


def test_when_idle_the_wal_is_emptied_without_waiting_for_a_reader(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "events.db") as journal:
        produce(journal, 20)
        kept = keeper(journal, Budget(Retention.keep))
        assert journal.log.sizes()[1] > 0
        # A reader in the middle of a read: the checkpoint cannot start the WAL over.
        reader = sqlite3.connect(journal.log.path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()
        tend(kept)  # sees the head
        started = time.monotonic()
        tend(kept)  # idle since: tries, and gives up at once
        assert time.monotonic() - started < 1.0  # not the 5 s busy timeout
        assert kept.counts.checkpoints_busy == 1
        assert journal.log.sizes()[1] > 0
        reader.execute("COMMIT")
        reader.close()
        tend(kept)
        assert kept.counts.checkpoints == 1
        assert journal.log.sizes()[1] == 0


def test_the_agent_runs_retention_in_the_background_and_metrics_count_what_it_did(tmp_path: Path) -> None:
    config = agent_config(
        tmp_path / "data", speed=1000, log={"retention": "archive", "max_mb": 0.001, "snapshot_every": 10}
    )

    def scrape(url: str) -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bytes(response.read()).decode()

    async def scenario() -> None:
        async with Agent(config) as agent:
            gateway = Gateway(agent, config)  # no broker: only for what /metrics reads of it
            server = HealthServer("127.0.0.1", 0, lambda: [], service.metrics(agent, gateway))
            server.start()
            try:
                async with running(agent):
                    for n in range(10):
                        await agent.submit(order(f"bg-{n}"))
                    await agent.wait_until(lambda state: not state.work_items)
                    agent.save_cursor(OUTBOX_CURSOR, agent.state.last_seq)  # as the outbox does once all is delivered
                    async with asyncio.timeout(10):
                        while agent.retention.counts.compactions == 0:  # it looks every second: nothing to await
                            await asyncio.sleep(0.1)
                    base = agent.journal.log.base().seq
                    assert base > 0
                    assert verify(agent.journal.log).fault is None
                    metrics = await asyncio.to_thread(scrape, f"http://127.0.0.1:{server.port}/metrics")
            finally:
                server.stop()
        assert "edge_agent_log_compactions_total 1.0" in metrics
        assert f"edge_agent_log_events_removed_total {base}.0" in metrics
        for gauge in ("log_bytes", "log_archive_bytes"):
            assert float(re.findall(rf"^edge_agent_{gauge} (\S+)$", metrics, re.MULTILINE)[0]) > 0, gauge
        assert re.search(r"^edge_agent_log_wal_bytes \S+$", metrics, re.MULTILINE)

    asyncio.run(scenario())


def test_a_failing_disk_during_retention_is_logged_and_tried_again_and_leaves_a_whole_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.log.retention")
    disk = Disk()
    path = tmp_path / "events.db"

    async def scenario() -> None:
        with faulty_disk(disk, path), Journal.open(path, snapshot_every=10) as journal:
            produce(journal, 30)
            journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
            kept = Keeper(
                journal.log,
                Budget(Retention.archive, max_mb=0.001),
                tmp_path / "archive",
                FakeClock(),
                check_s=0.01,
                slice_events=10,
            )
            disk.break_now()
            task = asyncio.create_task(kept.run())
            async with asyncio.timeout(10):
                while disk.refused < 3:  # three looks at the log, each refused by the disk
                    await asyncio.sleep(0.01)
                assert not task.done()
                disk.heal()
                while kept.counts.compactions == 0:
                    await asyncio.sleep(0.01)
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            assert verify(journal.log).fault is None

    asyncio.run(scenario())
    assert "retention: " in caplog.text
    assert "tried again" in caplog.text
