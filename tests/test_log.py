"""The SQLite event log: appends, snapshots, recovery, verification, compaction."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import orjson
import pytest

from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.errors import ConfigError, LogCorrupted, LogError
from edge_agent.log.compact import Retention, compact
from edge_agent.log.journal import Journal, replay
from edge_agent.log.schema import MIGRATIONS
from edge_agent.log.store import GENESIS_HASH, EventLog, chain_hash
from edge_agent.log.verify import verify
from tests.support.plant import make_log, run


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return make_log(tmp_path / "events.db", orders=12, snapshot_every=20)


def sql(path: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(statement, args)


def test_a_new_log_is_a_wal_file_with_the_schema_and_full_durability(tmp_path: Path) -> None:
    with EventLog(tmp_path / "data" / "events.db") as log_:
        assert log_.migrations() == [name for name, _ in MIGRATIONS]
        assert log_._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert log_._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert log_.head().seq == 0
    with EventLog(tmp_path / "data" / "events.db", synchronous="normal") as log_:
        assert log_._db.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_migrations_are_applied_once_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    EventLog(path).close()
    EventLog(path).close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name, count(*) FROM schema_migrations GROUP BY name").fetchall()
    assert rows == [(name, 1) for name, _ in MIGRATIONS]


def test_a_batch_is_one_transaction_with_contiguous_seqs_and_a_hash_chain(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.db") as log_:
        log_.append([ev.EstopEngaged()])
        records = log_.append([ev.EstopReleased(), ev.OrderRejected(None, "not JSON"), ev.EstopEngaged()])
        assert [r.seq for r in records] == [2, 3, 4]
        rows = list(log_.rows())
    prev = GENESIS_HASH
    for row in rows:
        assert row.hash == chain_hash(prev, row.seq, row.ts, row.type, row.subject, row.data)
        prev = row.hash
    assert rows[2].subject == ""
    assert orjson.loads(rows[2].data) == {"order_id": None, "reason": "not JSON"}


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.db") as log_:
        log_.append([ev.EstopEngaged()])

        def crash_before_commit() -> None:
            with log_.transaction() as tx:
                tx.append([ev.EstopReleased(), ev.EstopEngaged()])
                raise RuntimeError("crash before commit")

        with pytest.raises(RuntimeError):
            crash_before_commit()
        assert log_.head().seq == 1
        assert log_.append([ev.EstopReleased()])[0].seq == 2


def test_the_journal_applies_events_only_after_they_are_committed(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "events.db") as journal:
        before = journal.state
        journal.log._db.execute("PRAGMA query_only = ON")  # every write now fails
        with pytest.raises(LogError, match="cannot write"):
            journal.append([ev.EstopEngaged()])
        assert journal.state is before
        journal.log._db.execute("PRAGMA query_only = OFF")
        journal.append([ev.EstopEngaged()])
        assert journal.state.estop


def test_snapshots_are_taken_every_n_events_in_the_same_transaction(tmp_path: Path) -> None:
    path = make_log(tmp_path / "events.db", orders=12, snapshot_every=20)
    with EventLog(path, readonly=True) as log_:
        seqs = log_.snapshot_seqs()
        assert len(seqs) == log_.head().seq // 20
        for seq in seqs:
            snapshot = log_.snapshot(seq)
            assert snapshot.state == fold(State(), log_.read(1, seq))


def test_start_up_uses_the_newest_intact_snapshot_and_passes_over_a_damaged_one(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        newest = log_.snapshot_seqs()[-1]
        full = fold(State(), log_.read())
    sql(db, "UPDATE snapshots SET state = replace(state, '\"estop\":false', '\"estop\":true') WHERE seq = ?", newest)
    with EventLog(db, readonly=True) as log_:
        with pytest.raises(LogCorrupted, match="checksum"):
            log_.snapshot(newest)
        snapshot = log_.latest_snapshot()
        assert snapshot is not None
        assert snapshot.seq < newest
    with Journal.open(db) as journal:
        assert journal.state == full


def test_start_up_refuses_a_broken_chain_in_the_tail(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        in_tail = log_.snapshot_seqs()[-1] + 1
        assert in_tail <= log_.head().seq
    sql(db, "UPDATE events SET ts = '2030-01-01T00:00:00.000000Z' WHERE seq = ?", in_tail)
    with pytest.raises(LogCorrupted, match=f"seq {in_tail}"):
        Journal.open(db)


def test_replay_to_a_seq_equals_the_fold_of_that_prefix(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        for to_seq in (0, 1, 19, 20, 21, 57):
            assert replay(log_, to_seq) == fold(State(), log_.read(1, to_seq))


def test_replay_until_a_time_stops_at_the_first_later_event_even_if_the_clock_went_back(tmp_path: Path) -> None:
    from edge_agent.clock import FakeClock

    clock = FakeClock()
    with Journal.open(tmp_path / "events.db", clock=clock) as journal:
        run(journal, cmd.EngageEstop())  # 00:00:00
        clock.advance(10)
        run(journal, cmd.ReleaseEstop())  # 00:00:10
        clock.advance(-8)  # the wall clock jumped back
        run(journal, cmd.EngageEstop())  # 00:00:02
        state = replay(journal.log, until="2026-01-01T00:00:05.000000Z")
    assert state.last_seq == 1
    assert state.estop


# -- verify -----------------------------------------------------------------------


def test_an_intact_log_verifies(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None
        assert (verdict.first_seq, verdict.last_seq, verdict.events) == (1, log_.head().seq, log_.head().seq)
        assert verdict.snapshots == len(log_.snapshot_seqs())


def _fault(path: Path) -> LogCorrupted:
    with EventLog(path, readonly=True) as log_:
        fault = verify(log_).fault
    assert fault is not None
    return fault


def test_verify_names_an_edited_event(db: Path) -> None:
    sql(db, "UPDATE events SET data = replace(data, '}', ',\"forged\":1}') WHERE seq = 7")
    assert _fault(db).seq == 7


def test_verify_names_a_deleted_event(db: Path) -> None:
    sql(db, "DELETE FROM events WHERE seq = 33")
    fault = _fault(db)
    assert fault.seq == 33
    assert "missing" in str(fault)


def test_verify_names_reordered_events(db: Path) -> None:
    sql(db, "UPDATE events SET seq = -1 WHERE seq = 41")
    sql(db, "UPDATE events SET seq = 41 WHERE seq = 42")
    sql(db, "UPDATE events SET seq = 42 WHERE seq = -1")
    assert _fault(db).seq == 41


def test_verify_names_a_snapshot_that_differs_from_replay(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        seq = log_.snapshot_seqs()[0]
        state = log_.snapshot(seq).state
    from msgspec.structs import replace

    from edge_agent.domain.codec import state_to_dict
    from edge_agent.log.store import _checksum

    forged = orjson.dumps(state_to_dict(replace(state, inventory_seq=99))).decode()
    sql(db, "UPDATE snapshots SET state = ?, checksum = ? WHERE seq = ?", forged, _checksum(forged), seq)
    fault = _fault(db)
    assert fault.seq == seq
    assert "differs from the replayed state" in str(fault)


# -- compaction -----------------------------------------------------------------


def test_compact_keep_removes_nothing(db: Path) -> None:
    with EventLog(db) as log_:
        result = compact(log_, Retention.keep, db.parent / "archive")
        assert result.removed == 0
        assert log_.base().seq == 0


def test_compact_archive_moves_covered_events_to_gzip_jsonl_and_the_rest_still_verifies(db: Path) -> None:
    with EventLog(db) as log_:
        head = log_.head().seq
        exported = [row.hash for row in log_.rows()]
        state = replay(log_)
        result = compact(log_, Retention.archive, db.parent / "archive")
        cut = log_.snapshot_seqs()[-1]
        assert result.up_to_seq == cut
        assert result.removed == cut
        assert log_.snapshot_seqs() == [cut]
        assert verify(log_).fault is None
        assert replay(log_) == state
        assert log_.head().seq == head
    assert result.archive is not None
    with gzip.open(result.archive) as archive:
        lines = [orjson.loads(line) for line in archive]
    assert [line["seq"] for line in lines] == list(range(1, cut + 1))
    assert [line["hash"] for line in lines] == exported[:cut]
    with Journal.open(db) as journal:  # the agent starts from the compacted log
        assert journal.state == state
        run(journal, cmd.EngageEstop())
    with EventLog(db) as log_:  # a second compaction continues from the base
        assert verify(log_).fault is None


def test_compact_drop_deletes_without_an_archive(db: Path) -> None:
    with EventLog(db) as log_:
        result = compact(log_, Retention.drop, db.parent / "archive")
        assert result.archive is None
        assert result.removed > 0
        assert verify(log_).fault is None
    assert not (db.parent / "archive").exists()


def test_replay_before_the_compacted_base_is_a_clear_error(db: Path) -> None:
    with EventLog(db) as log_:
        compact(log_, Retention.drop, db.parent / "archive")
        with pytest.raises(LogError, match="compacted away"):
            replay(log_, 3)


# -- opening --------------------------------------------------------------------


def test_reading_never_creates_a_log(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no log at"):
        EventLog(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()


def test_a_foreign_sqlite_file_is_not_taken_for_a_log(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    sql(path, "CREATE TABLE t (x)")
    with pytest.raises(ConfigError, match="not an edge-agent log"):
        EventLog(path, readonly=True)


def test_a_read_only_log_refuses_writes(db: Path) -> None:
    with EventLog(db, readonly=True) as log_, pytest.raises(LogError, match="read-only"):
        log_.append([ev.EstopEngaged()])
