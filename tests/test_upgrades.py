"""Upgrades: a newer release's log is refused unchanged; `upgrade check` says what will happen.

The logs start as golden logs (tests/golden/), copied; a "newer release" is made by
writing into the copy what such a release records of itself (its `writers` row, a
migration of its own, or a step list of its own).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from edge_agent import __version__
from edge_agent.domain import events as ev
from edge_agent.log.journal import Journal
from tests.support import ROOT
from tests.support.cli import cli, edge_agent
from tests.support.configs import config_file
from tests.support.plant import damage_newest_event

GOLDEN = ROOT / "tests" / "golden"
NEWER = "9.0.0"

# What a newer release could write that this one does not know, as its `writers` row says.
NEWER_FORMATS = {
    "snapshot format": {"events": {}, "snapshot": 99, "workflow": 1},
    "event type": {"events": {"OrderRerouted": 1}, "snapshot": 1, "workflow": 1},
    "payload version": {"events": {"StepCompleted": 99}, "snapshot": 1, "workflow": 1},
    "workflow version": {"events": {}, "snapshot": 1, "workflow": 99},
}


def golden_copy(tmp_path: Path, release: str = __version__, name: str = "inflight.db") -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    shutil.copyfile(GOLDEN / release / name, data / "events.db")
    return data / "events.db"


def written_by_newer(log: Path, formats: dict[str, object] | None) -> None:
    """Record in `log` what release NEWER records when it writes: its formats (its writers
    row), or, with None, formats this release knows and a migration of its own."""
    with sqlite3.connect(log) as db:
        if formats is None:
            db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES ('0099_newer', 'then')")
            formats = {"events": {}, "snapshot": 1, "workflow": 1}
        db.execute(
            "INSERT INTO writers (release, formats, first_at, last_at) VALUES (?, ?, 'then', 'then')",
            (NEWER, orjson.dumps(formats).decode()),
        )
    db.close()


def fingerprint(log: Path) -> tuple[bytes, int]:
    """The log's bytes and its mtime."""
    return log.read_bytes(), log.stat().st_mtime_ns


def beside(log: Path) -> list[str]:
    return sorted(p.name for p in log.parent.iterdir())


@pytest.mark.parametrize("newer", [*NEWER_FORMATS, "migration"])
def test_a_log_from_a_newer_release_is_refused_at_start_and_left_unchanged(tmp_path: Path, newer: str) -> None:
    log = golden_copy(tmp_path)
    written_by_newer(log, NEWER_FORMATS.get(newer))
    config = config_file(tmp_path / "etc", data_dir=log.parent)
    (log.parent / "lock").touch()  # the lock the agent takes first: only the log itself is compared
    before, files = fingerprint(log), beside(log)

    started = edge_agent("run", "--config", config)

    assert started.returncode == 2, started.stderr
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1, started.stderr
    assert NEWER in lines[0], lines[0]  # the release that wrote it
    assert f"edge-agent {__version__}" in lines[0], lines[0]  # and this one
    assert fingerprint(log) == before  # no migration, no event
    assert beside(log) == files  # not even a -wal beside it


def test_an_item_of_a_step_list_this_release_does_not_have_stops_the_start(tmp_path: Path) -> None:
    log = golden_copy(tmp_path)
    with Journal.open(log) as journal:
        journal.append(
            [ev.OrderAccepted("future-1", "widget-a", 1, "WH1", 0, "d"), ev.StepCompleted("future-1", 0, "validate", 7)]
        )
    config = config_file(tmp_path / "etc", data_dir=log.parent)

    started = edge_agent("run", "--config", config)

    assert started.returncode == 2, started.stderr
    (line,) = started.stderr.strip().splitlines()
    assert "order future-1 follows workflow v7" in line, line
    assert f"edge-agent {__version__}" in line, line


def test_upgrade_check_reads_an_older_log_and_says_what_happens_to_each_live_item(tmp_path: Path) -> None:
    log = golden_copy(tmp_path, "0.1.0")
    before = fingerprint(log)

    done = cli("upgrade", "check", "--db", log, "--json")

    assert done.exit_code == 0, done.output
    found = json.loads(done.stdout)
    assert found["ok"] is True
    assert found["problems"] == []
    assert found["release"] == __version__
    assert found["releases"] == ["0.1.0"]
    assert found["payload_versions"]["StepCompleted"] == {"1": 23}  # as 0.1.0 wrote them
    assert found["snapshot_formats"] == {"1": 4}
    upcasts = found["upcasts"]  # to whatever version this release reads them as
    assert any(line.startswith("4 snapshot(s) of format 1 upcast to format ") for line in upcasts), upcasts
    assert any(line.startswith("23 StepCompleted event(s) of payload v1 upcast to v") for line in upcasts), upcasts
    assert "migration 0006_writers applied at start" in found["upcasts"]
    replayed = json.loads(cli("log", "replay", "--db", log, "--json").stdout)
    assert [item["order_id"] for item in found["items"]] == [item["order_id"] for item in replayed["work_items"]]
    for item in found["items"]:
        assert item["workflow"] in (1, None), item
        assert f"at step {item['steps_done']} ({item['next_step']}) of workflow v1" in item["action"], item
    assert fingerprint(log) == before  # read only (as every reader, it may leave an empty -wal beside it)

    text = cli("upgrade", "check", "--db", log)
    assert text.exit_code == 0
    assert f"ok: edge-agent {__version__} can take this log over" in text.stdout
    assert "A2  MoveToWarehouse" in text.stdout


def test_upgrade_check_on_a_newer_log_says_it_is_not_safe_and_why(tmp_path: Path) -> None:
    log = golden_copy(tmp_path)
    written_by_newer(log, NEWER_FORMATS["snapshot format"])

    done = edge_agent("upgrade", "check", "--db", log)

    assert done.returncode == 1, done.stderr
    assert "not safe" in done.stderr
    assert NEWER in done.stderr
    assert "snapshot format 99" in done.stderr


def test_upgrade_check_takes_a_config_or_a_log_not_both(tmp_path: Path) -> None:
    log = golden_copy(tmp_path)
    config = config_file(tmp_path / "etc", data_dir=log.parent)

    assert edge_agent("upgrade", "check", "--config", config).returncode == 0
    both = edge_agent("upgrade", "check", "--config", config, "--db", log)
    assert both.returncode == 2
    assert both.stderr.startswith("error: give --config or --db, not both")


def newest_snapshot_in_a_newer_format(log: Path) -> None:
    """A newer release's snapshot, and nothing else of it (no writers row, no migration)."""
    with sqlite3.connect(log) as db:
        seq, text = db.execute("SELECT seq, state FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
        text = text.replace('"format":2', '"format":99', 1)
        db.execute(
            "UPDATE snapshots SET state = ?, checksum = ? WHERE seq = ?",
            (text, hashlib.sha256(text.encode()).hexdigest(), seq),
        )
    db.close()


def damaged_where_replay_reads(log: Path) -> None:
    """An event edited after the newest snapshot (here: with the snapshots gone, any)."""
    with sqlite3.connect(log) as db:
        db.execute("DELETE FROM snapshots")
    db.close()
    damage_newest_event(log)


@pytest.mark.parametrize(
    ("release", "change", "exit_code"),
    [
        (__version__, newest_snapshot_in_a_newer_format, 2),
        (__version__, damaged_where_replay_reads, 3),
        ("0.1.0", damaged_where_replay_reads, 3),  # an older log: not even this release's migration is applied
    ],
)
def test_a_log_refused_for_what_its_events_or_snapshots_hold_is_left_unchanged(
    tmp_path: Path, release: str, change: Callable[[Path], None], exit_code: int
) -> None:
    """Found only by reading the log, not by what it says of its writers: the log is still
    evidence, and no migration or writer's record is written into it."""
    log = golden_copy(tmp_path, release)
    change(log)
    config = config_file(tmp_path / "etc", data_dir=log.parent)
    before = log.read_bytes()

    started = edge_agent("run", "--config", config)

    assert started.returncode == exit_code, started.stderr
    assert len(started.stderr.strip().splitlines()) == 1, started.stderr
    assert log.read_bytes() == before
