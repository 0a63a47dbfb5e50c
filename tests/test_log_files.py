"""The log's file: it says it is an edge-agent log and anything else is refused
unchanged; it and its folder and archives are private; compaction keeps what the outbox
has not published and archives whole or not at all; the running agent's durability is the
configured one."""

from __future__ import annotations

import asyncio
import gzip
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from edge_agent.agent import Agent
from edge_agent.clock import FakeClock
from edge_agent.config import Config
from edge_agent.errors import ConfigError
from edge_agent.log.compact import Retention, compact
from edge_agent.log.journal import Journal
from edge_agent.log.store import APPLICATION_ID, OUTBOX_CURSOR, EventLog
from tests.support.agents import running
from tests.support.configs import agent_config, config_file
from tests.support.plant import make_log, produce


def foreign_db(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('Ada')")
    db.close()


def foreign_wal_db(path: Path) -> None:
    """Another program's database in WAL mode, closed: a read-only open would add a -wal and -shm."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE events (id INTEGER PRIMARY KEY)")  # even a table of the same name
    db.commit()
    db.close()


def labelled_db(path: Path) -> None:
    """Another program's database that carries the log's label but none of its tables."""
    foreign_db(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.close()


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def empty(path: Path) -> None:
    path.touch()


NOT_LOGS: dict[str, Callable[[Path], None]] = {
    "foreign": foreign_db,
    "foreign-wal": foreign_wal_db,
    "labelled": labelled_db,
    "random": random_bytes,
    "empty": empty,
}
COMMANDS = (
    ("status",),
    ("log", "show"),
    ("log", "replay"),
    ("log", "verify"),
    ("log", "export"),
    ("log", "compact", "--retention", "drop"),
)


def edge_agent(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *(str(a) for a in args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def fingerprint(path: Path) -> tuple[bytes, int, list[str]]:
    """The file's bytes and mtime, and every file beside it."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("kind", sorted(NOT_LOGS))
def test_every_db_command_refuses_a_file_that_is_not_a_log_and_changes_nothing(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data" / "not-a-log.db"
    path.parent.mkdir()
    NOT_LOGS[kind](path)
    before = fingerprint(path)
    # Every command on the database; a reader and a writer on the rest (the same open refuses them all).
    for command in COMMANDS if kind in ("foreign", "labelled") else (COMMANDS[0], COMMANDS[-1]):
        result = edge_agent(tmp_path, *command, "--db", path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, f"{command}: exit {result.returncode}\n{result.stderr}"
        assert len(lines) == 1, f"{command}: {result.stderr}"
        assert "not an edge-agent log" in lines[0]
        assert fingerprint(path) == before, f"{command} changed {path} or left files beside it"


@pytest.mark.parametrize("keep", [100, 8192], ids=["header-only", "cut-short"])
def test_every_db_command_names_a_damaged_log_in_one_line(tmp_path: Path, keep: int) -> None:
    """A log cut short (a failed copy, a full disk): the file and SQLite's verdict, exit 1."""
    whole = make_log(tmp_path / "whole.db", orders=20)
    damaged = tmp_path / "data" / "events.db"
    damaged.parent.mkdir()
    damaged.write_bytes(whole.read_bytes()[:keep])
    for command in COMMANDS:
        result = edge_agent(tmp_path, *command, "--db", damaged)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, f"{command}: exit {result.returncode}\n{result.stderr}"
        assert len(lines) == 1, f"{command}: {result.stderr}"
        assert lines[0].startswith("error: "), lines[0]
        assert str(damaged) in lines[0], lines[0]
        assert "malformed" in lines[0], lines[0]
        assert "DatabaseError" not in lines[0], lines[0]


def files_config(data_dir: Path, **log: str) -> Config:
    return agent_config(data_dir, device_id="files-test", speed=50, log=log)


def test_the_agent_refuses_a_data_dir_whose_events_db_is_not_a_log_and_changes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    foreign_db(data_dir / "events.db")
    before = fingerprint(data_dir / "events.db")
    result = edge_agent(tmp_path, "run", "--config", config_file(tmp_path, data_dir=data_dir))
    assert result.returncode == 2, result.stderr
    assert "not an edge-agent log" in result.stderr
    content, mtime, beside = fingerprint(data_dir / "events.db")
    assert (content, mtime) == before[:2]
    assert set(beside) == {*before[2], "lock"}  # only the data folder's lock, taken before all else


def test_a_new_log_says_it_is_one(tmp_path: Path) -> None:
    path = make_log(tmp_path / "events.db", orders=1)
    assert int.from_bytes(path.read_bytes()[68:72], "big") == APPLICATION_ID
    with EventLog(path, readonly=True) as log_:  # and it opens, read-only or not
        assert log_.head().seq > 0
    EventLog(path).close()


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_data_dir_log_and_archives_are_private_whatever_the_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "plant" / "var"
    path = data_dir / "events.db"
    with umask(0):
        make_log(path, orders=12, snapshot_every=10)
        with EventLog(path) as log_:
            log_.append([])
            wal, shm = path.with_name("events.db-wal"), path.with_name("events.db-shm")
            assert (mode(wal), mode(shm)) == (0o640, 0o640)
            result = compact(log_, Retention.archive, data_dir / "archive")
        assert result.archive is not None
        assert (mode(data_dir), mode(data_dir.parent)) == (0o750, 0o750)
        assert mode(path) == 0o640
        assert mode(data_dir / "archive") == 0o750
        assert mode(result.archive) == 0o640


def test_compaction_never_removes_an_event_the_outbox_has_not_published(tmp_path: Path) -> None:
    path = make_log(tmp_path / "events.db", orders=10, snapshot_every=10)
    with EventLog(path) as log_:
        head = log_.head().seq
        assert log_.snapshot_seqs()[-1] > 40  # the newest snapshot is well past the cursor
        log_.save_cursor(OUTBOX_CURSOR, 25)
        unpublished = list(log_.rows(26))
        result = compact(log_, Retention.drop, tmp_path / "archive")
        assert result.up_to_seq is not None
        assert result.up_to_seq <= 25
        assert list(log_.rows(26)) == unpublished
        assert log_.head().seq == head


def test_compaction_removes_nothing_the_broker_never_acknowledged(tmp_path: Path) -> None:
    """A cell that never reached its broker has published nothing: every event stays."""
    path = tmp_path / "events.db"
    with Journal.open(path, snapshot_every=10, clock=FakeClock()) as journal:
        produce(journal, 10)
    with EventLog(path) as log_:
        assert log_.cursor(OUTBOX_CURSOR) is None
        assert len(log_.snapshot_seqs()) > 3
        everything = list(log_.rows())
        result = compact(log_, Retention.drop, tmp_path / "archive")
        assert (result.removed, result.up_to_seq) == (0, None)
        assert list(log_.rows()) == everything


def archived_rows(path: Path) -> list[dict[str, object]]:
    with gzip.open(path, "rb") as archive:
        return [orjson.loads(line) for line in archive]


def test_an_archive_is_complete_under_its_name_or_absent_and_no_event_goes_before_it(tmp_path: Path) -> None:
    path = make_log(tmp_path / "events.db", orders=10, snapshot_every=10)
    archive_dir = tmp_path / "archive"
    with sqlite3.connect(path) as db:  # an event that cannot be written out: the archive fails half-way
        db.execute("UPDATE events SET data = '{not json' WHERE seq = 20")
    db.close()
    with EventLog(path) as log_:
        head, count = log_.head().seq, log_.count()
        with pytest.raises(orjson.JSONDecodeError):
            compact(log_, Retention.archive, archive_dir)
        assert list(archive_dir.iterdir()) == []  # no archive, not even a partial one
        assert (log_.head().seq, log_.count()) == (head, count)
    with sqlite3.connect(path) as db:
        db.execute("""UPDATE events SET data = '{"reason": "test"}', type = 'AgentStopped' WHERE seq = 20""")
    db.close()

    with EventLog(path) as log_:
        before = {row.seq: row for row in log_.rows()}
        result = compact(log_, Retention.archive, archive_dir)
        assert result.archive is not None
        assert result.up_to_seq is not None
        removed = [before[seq] for seq in sorted(before) if seq <= result.up_to_seq]
        assert [p.name for p in archive_dir.iterdir()] == [result.archive.name]
        archived = archived_rows(result.archive)
        assert [(r["seq"], r["hash"]) for r in archived] == [(row.seq, row.hash) for row in removed]
        assert [r["data"] for r in archived] == [orjson.loads(row.data) for row in removed]
        assert log_.count(1, result.up_to_seq) == 0


@pytest.mark.parametrize("level", ["full", "normal"])
def test_the_running_agent_commits_as_durably_as_configured(tmp_path: Path, level: str) -> None:
    async def scenario() -> str:
        async with Agent(files_config(tmp_path / "var", synchronous=level)) as agent, running(agent):
            await agent.wait_until(lambda state: state.last_seq > 0)
            return agent.journal.log.synchronous

    assert asyncio.run(scenario()) == level


def test_opening_a_file_that_is_not_a_log_for_writing_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    foreign_db(path)
    with pytest.raises(ConfigError, match="not an edge-agent log"):
        EventLog(path)
