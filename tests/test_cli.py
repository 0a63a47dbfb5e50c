"""The `edge-agent` command line on real SQLite logs.

Quick output checks run the typer app in-process; exit codes, stderr and the
console script's error handling run `python -m edge_agent` in a subprocess.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import pytest
import typer
from typer.core import TyperGroup

import edge_agent.cli.log as cli_log
from edge_agent import __version__
from edge_agent.cli import app
from edge_agent.clock import FakeClock
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.domain.view import state_view
from edge_agent.lock import LOCK_NAME, DataDirLock, holder
from edge_agent.log.journal import Journal, replay
from edge_agent.log.store import OUTBOX_CURSOR, Base, EventLog
from tests.support import PROFILE, WAIT_S
from tests.support.agents import subprocess_env
from tests.support.cli import RUNNER, cli
from tests.support.cli import edge_agent as agent
from tests.support.orders import order
from tests.support.plant import PRODUCTS, STATIONS, make_log, run

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
PHASE_S = 10.0  # the fake clock moves this far between the phases of the cell's day

STATE_KEYS = {"last_seq", "estop", "inventory_seq", "stations", "lane", "work_items"}
ITEM_KEYS = {"order_id", "product_id", "qty", "warehouse", "stage", "station", "progress", "units_done", "reason"}
EVENT_KEYS = {"seq", "ts", "type", "subject", "data"}
CLOCK_KEYS = ("wait_s", "build_s")  # durations `status` measures up to the real "now"

# -- the log under test ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The writer's own state at the end of a phase (all events of a phase share one ts)."""

    at: datetime
    state: State


@dataclass(frozen=True)
class Cell:
    path: Path
    checkpoints: list[Checkpoint]

    @property
    def last(self) -> State:
        return self.checkpoints[-1].state


def work_a_day(journal: Journal, clock: FakeClock) -> list[Checkpoint]:
    """Orders in every stage: building, waiting to ship, shipping, failed, one shipped and tidied up; e-stop on."""
    checkpoints: list[Checkpoint] = []

    def phase(*commands: cmd.Command) -> None:
        for command in commands:
            run(journal, command, clock)
        checkpoints.append(Checkpoint(clock.now(), journal.state))
        clock.advance(PHASE_S)

    orders = [
        ("o1", "widget-a", 2, "WH1", 0),
        ("o2", "gadget-b", 4, "WH2", 5),
        ("o3", "widget-a", 1, "WH1", 0),
        ("o4", "widget-a", 3, "WH1", 1),
        ("o5", "widget-a", 2, "WH1", 0),
        ("o6", "gadget-b", 1, "WH3", 0),
    ]
    phase(
        cmd.ConfigurePlant(STATIONS, PRODUCTS),
        *(order(oid, qty, product=product, warehouse=wh, priority=prio) for oid, product, qty, wh, prio in orders),
        *(cmd.QueueOrder(oid) for oid, *_ in orders),
        cmd.RejectOrder("bad-1", "unknown product 'sprocket-z'"),
    )
    phase(cmd.AssignStations())  # s1 <- o2 (priority 5), s2 <- o4 (priority 1), s3 <- o1 (oldest of priority 0)
    phase(
        cmd.RecordUnit("s1"),
        cmd.RecordUnit("s3"),
        cmd.RecordUnit("s3"),  # o1 complete
        cmd.StartShipment(),  # o1 on the lane
        cmd.AssignStations(),  # s3 <- o3
    )
    phase(
        cmd.RecordArrival(),  # o1 -> INV00001
        cmd.TidyUp("o1"),
        cmd.RecordUnit("s3"),  # o3 complete
        cmd.StartShipment(),  # o3 on the lane
        cmd.AssignStations(),  # s3 <- o5
        cmd.RecordUnit("s3"),
        cmd.RecordUnit("s3"),  # o5 complete, queued behind o3
        cmd.AssignStations(),  # s3 <- o6
    )
    phase(cmd.FailOrder("o4", "no unit within 30 s"), cmd.EngageEstop())
    return checkpoints


pytestmark = pytest.mark.usefixtures("isolated")  # no ./config.yaml or EDGE_AGENT_* of the developer's


@pytest.fixture
def cell(tmp_path: Path) -> Cell:
    """A closed log (with snapshots every 10 events) of a cell in the middle of its work."""
    path = tmp_path / "data" / "events.db"
    clock = FakeClock(T0)
    with Journal.open(path, synchronous="normal", snapshot_every=10, clock=clock) as journal:
        checkpoints = work_a_day(journal, clock)
        journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)  # the broker has it all
    return Cell(path, checkpoints)


# -- helpers ---------------------------------------------------------------------------------------------------------


def log_ts(moment: datetime) -> str:
    """A moment in the log's `ts` format (ISO 8601, UTC, microseconds, Z)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines, "no output"
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(obj, dict) for obj in parsed)
    return parsed


def timeless(view: dict[str, Any]) -> dict[str, Any]:
    """A state view without the durations that depend on when it was printed."""
    items = [{k: v for k, v in item.items() if k not in CLOCK_KEYS} for item in view["work_items"]]
    return {**view, "work_items": items}


def stored_events(path: Path) -> list[dict[str, Any]]:
    """The log's events as `log export` should write them."""
    with EventLog(path, readonly=True) as log_:
        return [
            {"seq": r.seq, "ts": r.ts, "type": r.type, "subject": r.subject, "data": json.loads(r.data), "hash": r.hash}
            for r in log_.rows()
        ]


def without_hash(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "hash"}


def fold_from_scratch(path: Path, to_seq: int) -> State:
    """The state after `to_seq`, folded from the first event (no snapshot involved)."""
    with EventLog(path, readonly=True) as log_:
        return fold(State(), list(log_.read(1, to_seq)))


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def flat(text: str) -> str:
    """Help text with rich's box drawing and line wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


# -- --help everywhere -----------------------------------------------------------------------------------------------


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group of the app, with the words that reach it."""
    yield path, command
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(typer.main.get_command(app)))


def test_the_app_has_the_spec_commands() -> None:
    paths = {path for path, _ in COMMANDS}
    assert {("run",), ("status",), ("log",)} <= paths
    assert {("log", name) for name in ("show", "replay", "verify", "export", "compact")} <= paths


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(("edge-agent", *p)) for p, _ in COMMANDS])
def test_every_command_has_help(path: tuple[str, ...], command: Any) -> None:
    assert command.help, f"`edge-agent {' '.join(path)}` has no help text (docstring)"
    result = cli(*path, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    shown = flat(result.stdout)
    assert f"Usage: {' '.join(('edge-agent', *path))}" in shown
    assert flat(command.help.splitlines()[0]) in shown
    if isinstance(command, TyperGroup):
        for name in command.commands:
            assert name in shown, f"`{name}` is missing from the help of `{' '.join(path)}`"


def test_help_shows_each_option_text_verbatim() -> None:
    """Help texts keep their `[default: ...]` parts (rich markup would read them as tags and drop them)."""
    missing = []
    for path, command in COMMANDS:
        shown = flat(cli(*path, "--help", env={"COLUMNS": "200"}).stdout)
        for param in command.params:
            text = getattr(param, "help", None)
            if text and flat(text.replace("\\[", "[")) not in shown:
                missing.append(f"edge-agent {' '.join(path)} {param.opts[0]}: {text!r}")
    assert not missing, "option help not shown as written:\n" + "\n".join(missing)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(("edge-agent", *p)) for p, _ in COMMANDS])
def test_help_shows_flags_as_flags(path: tuple[str, ...], command: Any) -> None:
    """`--json <bool>` reads as if the flag took a value (`--json true`); a flag is shown bare."""
    shown = cli(*path, "--help", env={"COLUMNS": "200"}).stdout
    assert "<bool>" not in shown
    assert "--help" in shown


def test_version() -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"edge-agent {__version__}"


# -- status ----------------------------------------------------------------------------------------------------------


def test_status_json_is_the_live_state_while_the_agent_writes(cell: Cell) -> None:
    clock = FakeClock(T0 + timedelta(hours=1))
    with Journal.open(cell.path, synchronous="normal", snapshot_every=10, clock=clock) as journal:  # the agent runs
        run(journal, cmd.ReleaseEstop(), clock)
        run(journal, cmd.RecordUnit("s1"), clock)
        result = cli("status", "--db", cell.path, "--json")
        expected = state_view(journal.state)

    assert result.exit_code == 0, result.output
    (view,) = json_lines(result.stdout)
    assert view.keys() >= STATE_KEYS
    # A Journal, not an agent: nobody holds the data folder's lock.
    assert timeless(view) == timeless(
        {
            **expected,
            # The broker acknowledged the cell's day, not what came after it.
            "outbox": {"published_seq": cell.last.last_seq, "waiting": journal.state.last_seq - cell.last.last_seq},
            "agent": {"running": False, "pid": None, "since": None},
        }
    )
    # what an operator reads off it
    assert view["last_seq"] == journal.state.last_seq
    assert view["estop"] is False
    assert view["inventory_seq"] == 1
    assert view["stations"] == [
        {"id": "s1", "state": "building", "order_id": "o2"},
        {"id": "s2", "state": "idle", "order_id": None},
        {"id": "s3", "state": "building", "order_id": "o6"},
    ]
    assert view["lane"] == {"state": "moving", "order_id": "o3", "queue": ["o5"]}
    items = {item["order_id"]: item for item in view["work_items"]}
    assert list(items) == ["o2", "o3", "o4", "o5", "o6"]  # o1 shipped and was tidied up
    for item in items.values():
        assert item.keys() >= ITEM_KEYS
    o2 = items["o2"]
    assert (o2["product_id"], o2["qty"], o2["warehouse"]) == ("gadget-b", 4, "WH2")
    assert (o2["stage"], o2["station"], o2["units_done"], o2["progress"], o2["reason"]) == (
        "FactoryAccepted",
        "s1",
        2,
        50,
        None,
    )
    assert items["o3"]["stage"] == "MoveToWarehouse"
    assert items["o4"]["stage"] == "Failed"
    assert items["o4"]["reason"] == "no unit within 30 s"
    assert items["o5"]["stage"] == "FactoryComplete"
    assert (items["o5"]["progress"], items["o5"]["units_done"]) == (100, 2)
    assert (items["o6"]["stage"], items["o6"]["progress"]) == ("FactoryAccepted", 0)
    assert all(isinstance(o2[key], float) for key in CLOCK_KEYS)  # measured up to now


def test_status_shows_how_far_the_broker_has_acknowledged_the_outbox(cell: Cell) -> None:
    """A broker refusing or away shows as events waiting, not as nothing."""
    with EventLog(cell.path) as log_:
        log_.save_cursor(OUTBOX_CURSOR, 12)
    waiting = cell.last.last_seq - 12
    as_json = cli("status", "--db", cell.path, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json_lines(as_json.stdout)[0]["outbox"] == {"published_seq": 12, "waiting": waiting}
    as_text = cli("status", "--db", cell.path, env={"COLUMNS": "200"})
    assert f"outbox published up to seq 12, {waiting} waiting" in as_text.stdout


def test_status_table(cell: Cell) -> None:
    result = cli("status", "--db", cell.path, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"log position {cell.last.last_seq}" in text
    assert "ENGAGED" in text  # the e-stop
    for word in ("s1", "s2", "s3", "o2", "o3", "o4", "o5", "o6", "FactoryAccepted", "Failed", "no unit within 30 s"):
        assert word in text
    assert "o1" not in text  # tidied up
    assert "50%" not in text
    assert "25% (1/4)" in text


def test_status_reads_the_configured_log(cell: Cell, tmp_path: Path) -> None:
    config = tmp_path / "cell.yaml"
    config.write_text("device_id: cell-07\ndata_dir: data\n")  # relative to the config file
    result = cli("status", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["last_seq"] == cell.last.last_seq


HOSTILE_WAREHOUSE = "WH1\x1b]0;pwned\x07\x1b[2J"  # retitle the terminal, ring it, clear the screen
HOSTILE_REASON = "jam\x9b31m at s1\x7f\nnext line\u2028\u202edesrever"  # C1 CSI, DEL, newlines, a bidi override


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A log (an old one, or a `--db` file from elsewhere) whose strings hold control characters."""
    path = tmp_path / "hostile" / "events.db"
    clock = FakeClock(T0)
    with Journal.open(path, synchronous="normal", snapshot_every=10, clock=clock) as journal:
        run(journal, cmd.ConfigurePlant(STATIONS, PRODUCTS), clock)
        run(journal, order("h1", warehouse=HOSTILE_WAREHOUSE), clock)
        run(journal, cmd.QueueOrder("h1"), clock)
        run(journal, cmd.FailOrder("h1", HOSTILE_REASON), clock)
    return path


# Every control character but the line feed, line separators and bidirectional controls.
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("status", "--json"),
        ("log", "show"),
        ("log", "show", "--json"),
        ("log", "replay"),
        ("log", "export"),
    ],
    ids=" ".join,
)
def test_no_output_writes_a_control_character_taken_from_the_log(hostile: Path, command: tuple[str, ...]) -> None:
    done = agent(*command, "--db", hostile, env=subprocess_env(COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    assert not CONTROL.search(done.stdout), repr(CONTROL.search(done.stdout))
    if "--json" in command or "export" in command:  # escaped the JSON way: the same values
        values = json.dumps(json_lines(done.stdout))
        assert json.dumps(HOSTILE_WAREHOUSE) in values
        assert json.dumps(HOSTILE_REASON) in values
    elif command == ("log", "show"):  # the data as JSON text, which escapes C0 its own way
        assert "WH1\\u001b]0;pwned\\u0007\\u001b[2J" in done.stdout
        assert "jam\\x9b31m at s1\\x7f\\nnext line" in done.stdout
    else:  # escaped so that the operator can still read what is there
        assert "WH1\\x1b]0;pwned\\x07\\x1b[2J" in done.stdout
        assert "jam\\x9b31m at s1\\x7f" in done.stdout


def test_status_reads_well_at_80_columns(tmp_path: Path) -> None:
    """Order ids whole, stages intelligible, no line past the edge (the full values are in --json)."""
    path = tmp_path / "demo" / "events.db"
    clock = FakeClock(T0)
    order_ids = [f"demo-{n:04d}" for n in range(1, 7)] + ["ERP-2026-000123"]
    with Journal.open(path, synchronous="normal", snapshot_every=10, clock=clock) as journal:
        run(journal, cmd.ConfigurePlant(STATIONS, PRODUCTS), clock)
        for n, order_id in enumerate(order_ids):
            run(journal, order(order_id, 2, priority=n % 2), clock)
            run(journal, cmd.QueueOrder(order_id), clock)
        run(journal, cmd.AssignStations(), clock)
        run(journal, cmd.RecordUnit("s1"), clock)
        run(journal, cmd.FailOrder("demo-0006", "no unit within 30 s, retried 3 times"), clock)

    result = cli("status", "--db", path, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, "\n" + result.stdout
    assert "…" not in result.stdout
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in order_ids}
    assert set(rows) == set(order_ids), "\n" + result.stdout  # every id whole, on one line
    assert "building" in rows["demo-0002"]  # the stage, abbreviated but plain (priority 1: a station first)
    assert "failed" in rows["demo-0006"]
    assert "ready" in rows["ERP-2026-000123"]
    assert "no unit within 30 s" in " ".join(result.stdout.split())
    assert "--json" in result.stdout  # where the whole values are


# -- log show --------------------------------------------------------------------------------------------------------


def show(cell: Cell, *args: str) -> list[dict[str, Any]]:
    result = cli("log", "show", "--db", cell.path, "--json", *args)
    assert result.exit_code == 0, result.output
    if not result.stdout:
        return []
    events = json_lines(result.stdout)
    for event in events:
        assert set(event) == EVENT_KEYS
        assert isinstance(event["data"], dict)
    return events


def test_log_show_json_is_every_event_in_order(cell: Cell) -> None:
    stored = [without_hash(e) for e in stored_events(cell.path)]
    assert show(cell) == stored
    assert [e["seq"] for e in stored] == list(range(1, cell.last.last_seq + 1))
    accepted = next(e for e in stored if e["type"] == "OrderAccepted" and e["subject"] == "o2")
    assert accepted["data"]["qty"] == 4
    assert accepted["ts"] == log_ts(T0)


def test_log_show_filters(cell: Cell) -> None:
    stored = [without_hash(e) for e in stored_events(cell.path)]
    assert show(cell, "--from", "5", "--to", "9") == stored[4:9]
    assert show(cell, "--from", "30") == stored[29:]
    assert show(cell, "--to", "3") == stored[:3]
    units = show(cell, "--type", "UnitBuilt")
    assert units == [e for e in stored if e["type"] == "UnitBuilt"]
    assert len(units) == 6
    assert show(cell, "--subject", "o1") == [e for e in stored if e["subject"] == "o1"]
    lifecycle = [e["type"] for e in show(cell, "--subject", "o1")]
    milestones = ["OrderAccepted", "OrderQueued", "StationAssigned", "BuildComplete", "InventoryIssued", "TidiedUp"]
    assert [t for t in lifecycle if t in milestones] == milestones
    assert lifecycle.count("UnitBuilt") == 2
    both = show(cell, "--subject", "o5", "--type", "UnitBuilt", "--from", "2")
    assert both == [e for e in stored if e["subject"] == "o5" and e["type"] == "UnitBuilt"]
    assert show(cell, "--type", "OrderCancelled") == []  # a type, none of it in this log
    assert show(cell, "--from", str(cell.last.last_seq + 1)) == []


def test_log_show_an_empty_range_is_a_usage_error(cell: Cell) -> None:
    done = agent("log", "show", "--db", cell.path, "--from", "10", "--to", "5")
    assert done.returncode == 2
    assert "--to 5 is before --from 10" in one_error_line(done.stderr)
    assert done.stdout == ""


def test_log_show_an_unknown_type_lists_the_types(cell: Cell) -> None:
    """A typo in --type would otherwise print nothing, as if no such event had happened."""
    done = agent("log", "show", "--db", cell.path, "--type", "OrderAccept")
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "--type: unknown event type 'OrderAccept'" in line
    for known in ("OrderAccepted", "UnitBuilt", "InventoryIssued", "AgentStarted"):
        assert known in line
    assert done.stdout == ""


def test_log_show_text_is_one_line_per_event(cell: Cell) -> None:
    result = cli("log", "show", "--db", cell.path, "--subject", "o4")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    stored = [e for e in stored_events(cell.path) if e["subject"] == "o4"]
    assert len(lines) == len(stored)
    for line, event in zip(lines, stored, strict=True):
        assert line.split()[:4] == [str(event["seq"]), event["ts"], event["type"], "o4"]
    assert "no unit within 30 s" in lines[-1]


class _LineReader:
    """Lines a subprocess prints, collected by a thread so that the test can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def take(self, n: int) -> list[str]:
        """The next `n` lines; fails if they do not come within WAIT_S."""
        got: list[str] = []
        deadline = time.monotonic() + WAIT_S
        while len(got) < n:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"waited {WAIT_S} s for {n} lines, got {len(got)}: {got}")
            if line is None:
                pytest.fail(f"the process ended after {len(got)} of {n} lines: {got}")
            got.append(line)
        return got


def test_log_show_follow_prints_new_events_as_they_are_logged(cell: Cell) -> None:
    known = cell.last.last_seq
    follower = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "log", "show", "--db", str(cell.path), "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert follower.stdout is not None
        lines = _LineReader(follower.stdout)
        assert [json.loads(line)["seq"] for line in lines.take(known)] == list(range(1, known + 1))

        clock = FakeClock(T0 + timedelta(hours=1))
        with Journal.open(cell.path, synchronous="normal", snapshot_every=10, clock=clock) as journal:
            first = run(journal, cmd.ReleaseEstop(), clock) + run(journal, cmd.RecordUnit("s1"), clock)
            new = [json.loads(line) for line in lines.take(len(first))]
            assert [(e["seq"], e["type"], e["subject"]) for e in new] == [
                (r.seq, type(r.event).__name__, r.event.subject) for r in first
            ]
            assert [e["seq"] for e in new] == list(range(known + 1, known + 1 + len(first)))
            assert [e["type"] for e in new[:2]] == ["EstopReleased", "UnitBuilt"]
            assert new[1]["data"] == {"order_id": "o2", "station": "s1"}
            assert all(e["ts"] == log_ts(clock.now()) for e in new)

            clock.advance(5)
            second = run(journal, cmd.CancelOrder("o6"), clock)  # it keeps following
            (cancelled,) = [json.loads(line) for line in lines.take(1)]
            assert (cancelled["seq"], cancelled["type"]) == (second[0].seq, "OrderCancelled")
        assert follower.poll() is None, "log show --follow stopped by itself"
    finally:
        follower.terminate()
        try:
            follower.wait(timeout=WAIT_S)
        finally:
            for stream in (follower.stdout, follower.stderr):
                if stream:
                    stream.close()


class _StopFollowing(Exception):
    pass


def test_log_show_follow_does_not_skip_events_logged_between_two_reads(
    cell: Cell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event committed while the follower is between two reads is printed on the next poll at the latest.
    The writer commits exactly in that window (deterministically, by hooking the reader's head lookup)."""
    late: list[ev.Recorded] = []
    committing = False  # the writer's own reads (it replays read-only first) are not the follower's

    def commit_late_event() -> None:
        nonlocal committing
        if late or committing:
            return
        committing = True
        try:
            with Journal.open(cell.path, synchronous="normal", snapshot_every=10) as journal:
                late.extend(journal.append([ev.OrderRejected("late-1", "arrived while the CLI was reading")]))
        finally:
            committing = False

    real_head = EventLog.head

    def head(self: EventLog) -> Base:
        if self.readonly:
            commit_late_event()
        return real_head(self)

    polls = 0

    def sleep(seconds: float) -> None:
        nonlocal polls
        polls += 1
        commit_late_event()
        if polls >= 3:
            raise _StopFollowing

    monkeypatch.setattr(EventLog, "head", head)
    monkeypatch.setattr(cli_log, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic, time=time.time))
    result = RUNNER.invoke(app, ["log", "show", "--db", str(cell.path), "--follow", "--json"])

    assert isinstance(result.exception, _StopFollowing), result.output
    assert late, "the test did not get to commit its event"
    seqs = [event["seq"] for event in json_lines(result.stdout)]
    assert seqs == list(range(1, late[0].seq + 1)), f"event {late[0].seq} was not printed"


# -- log replay ------------------------------------------------------------------------------------------------------


def replayed(cell: Cell, *args: str) -> dict[str, Any]:
    result = cli("log", "replay", "--db", cell.path, "--json", *args)
    assert result.exit_code == 0, result.output
    (view,) = json_lines(result.stdout)
    assert view.keys() >= STATE_KEYS
    return view


def test_log_replay_to_seq_is_the_state_folded_up_to_that_event(cell: Cell) -> None:
    with EventLog(cell.path, readonly=True) as log_:
        assert log_.snapshot_seqs(), "the test log should have snapshots for replay to start from"
    for seq in range(cell.last.last_seq + 1):
        assert replayed(cell, "--to", str(seq)) == state_view(fold_from_scratch(cell.path, seq)), f"--to {seq}"
    for checkpoint in cell.checkpoints:  # the state the writer itself held then
        assert replayed(cell, "--to", str(checkpoint.state.last_seq)) == state_view(checkpoint.state)
    assert replayed(cell) == state_view(cell.last)
    assert replayed(cell, "--to", str(cell.last.last_seq)) == state_view(cell.last)


def test_log_replay_to_past_the_end_says_where_the_log_ends(cell: Cell) -> None:
    """Not the last state passed off as the state at a seq the log never reached."""
    done = agent("log", "replay", "--db", cell.path, "--to", str(cell.last.last_seq + 1))
    assert done.returncode == 2
    assert one_error_line(done.stderr) == (
        f"error: --to {cell.last.last_seq + 1}: the log ends at seq {cell.last.last_seq}"
    )
    assert done.stdout == ""


def test_log_replay_until_time(cell: Cell) -> None:
    for checkpoint in cell.checkpoints:
        expected = state_view(checkpoint.state)
        with EventLog(cell.path, readonly=True) as log_:
            assert state_view(replay(log_, until=log_ts(checkpoint.at))) == expected
        # the same moment written as a user would: with Z, without a zone (UTC), with an offset
        assert replayed(cell, "--until", checkpoint.at.strftime("%Y-%m-%dT%H:%M:%SZ")) == expected
        assert replayed(cell, "--until", checkpoint.at.strftime("%Y-%m-%dT%H:%M:%S")) == expected
        local = checkpoint.at.astimezone(timezone(timedelta(hours=2)))
        assert replayed(cell, "--until", local.isoformat()) == expected
        # between two phases: still the earlier one
        between = checkpoint.at + timedelta(seconds=PHASE_S / 2)
        assert replayed(cell, "--until", between.isoformat()) == expected
    before = replayed(cell, "--until", (T0 - timedelta(seconds=1)).isoformat())
    assert (before["last_seq"], before["stations"], before["work_items"]) == (0, [], [])
    mid = cell.checkpoints[2]
    assert replayed(cell, "--until", mid.at.isoformat())["last_seq"] == mid.state.last_seq


def test_log_replay_table(cell: Cell) -> None:
    seq = cell.checkpoints[1].state.last_seq
    result = cli("log", "replay", "--db", cell.path, "--to", str(seq), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"log position {seq}" in result.stdout
    assert "released" in result.stdout
    assert "o1" in result.stdout


def test_log_replay_refuses_to_and_until_together(cell: Cell) -> None:
    done = agent("log", "replay", "--db", cell.path, "--to", "3", "--until", T0.isoformat())
    assert done.returncode == 2
    assert "--until" in one_error_line(done.stderr)
    assert done.stdout == ""


def test_log_replay_refuses_a_bad_time(cell: Cell) -> None:
    done = agent("log", "replay", "--db", cell.path, "--until", "yesterday")
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "--until" in line
    assert "yesterday" in line
    assert done.stdout == ""


def test_log_replay_shows_progress_on_long_logs(tmp_path: Path) -> None:
    path = tmp_path / "long.db"
    events = 21_000
    with Journal.open(path, synchronous="normal", snapshot_every=10**9) as journal:  # no snapshot: a full replay
        for batch in range(0, events, 7_000):
            journal.append([ev.OrderRejected(f"r{i}", "unreadable payload") for i in range(batch, batch + 7_000)])

    on_terminal = agent("log", "replay", "--db", path, "--json", env=subprocess_env(TTY_COMPATIBLE="1"))
    assert on_terminal.returncode == 0, on_terminal.stderr
    assert "Replaying" in on_terminal.stderr
    assert json.loads(on_terminal.stdout)["last_seq"] == events  # stdout stays clean JSON

    piped = agent("log", "replay", "--db", path, "--json")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert json.loads(piped.stdout)["last_seq"] == events


# -- log verify ------------------------------------------------------------------------------------------------------


def test_log_verify_ok(cell: Cell) -> None:
    with EventLog(cell.path, readonly=True) as log_:
        snapshots = len(log_.snapshot_seqs())
    result = cli("log", "verify", "--db", cell.path, "--json")
    assert result.exit_code == 0, result.output
    (verdict,) = json_lines(result.stdout)
    assert verdict == {
        "ok": True,
        "first_seq": 1,
        "last_seq": cell.last.last_seq,
        "events": cell.last.last_seq,
        "snapshots": snapshots,
        "fault": None,
    }
    assert snapshots >= 3
    text = cli("log", "verify", "--db", cell.path)
    assert text.exit_code == 0
    assert text.stdout.startswith("ok:")


def test_log_verify_of_a_log_or_archive_with_no_events_says_so(tmp_path: Path) -> None:
    """Not "events 1..0 (0)": an empty log (e.g. a `cp` of a running log without its -wal)
    is named as empty."""
    empty = tmp_path / "events.db"
    EventLog(empty).close()
    done = cli("log", "verify", "--db", empty)
    assert done.exit_code == 0
    assert done.stdout.startswith("ok: the log holds no events")
    archive = tmp_path / "empty.jsonl.gz"
    with gzip.open(archive, "wb"):
        pass
    done = cli("log", "verify", "--db", archive)
    assert (done.exit_code, done.stdout.strip()) == (0, "ok: the archive holds no events")


def test_log_verify_names_the_edited_event(cell: Cell) -> None:
    with EventLog(cell.path, readonly=True) as log_:
        (edited,) = (r.seq for r in log_.rows(type_="OrderAccepted", subject="o4"))
        assert edited < log_.snapshot_seqs()[0], "the edit should be covered by a snapshot"
    db = sqlite3.connect(cell.path)
    try:
        (text,) = db.execute("SELECT data FROM events WHERE seq = ?", (edited,)).fetchone()
        data = json.loads(text)
        data["qty"] = 30
        db.execute("UPDATE events SET data = ? WHERE seq = ?", (json.dumps(data, separators=(",", ":")), edited))
        db.commit()
    finally:
        db.close()

    done = agent("log", "verify", "--db", cell.path, "--json")
    assert done.returncode == 1
    assert f"seq {edited}" in one_error_line(done.stderr)
    verdict = json.loads(done.stdout)
    assert verdict["ok"] is False
    assert verdict["fault"]["seq"] == edited
    assert verdict["fault"]["reason"]


# -- log export ------------------------------------------------------------------------------------------------------


def test_log_export(cell: Cell, tmp_path: Path) -> None:
    stored = stored_events(cell.path)
    result = cli("log", "export", "--db", cell.path)
    assert result.exit_code == 0, result.output
    exported = json_lines(result.stdout)
    assert exported == stored
    assert len(exported) == cell.last.last_seq
    assert all(set(e) == EVENT_KEYS | {"hash"} and len(e["hash"]) == 64 for e in exported)

    target = tmp_path / "export.jsonl"
    to_file = cli("log", "export", "--db", cell.path, "--format", "jsonl", "--output", target)
    assert to_file.exit_code == 0, to_file.output
    assert to_file.stdout == ""
    assert target.read_text() == result.stdout


def test_log_export_never_writes_onto_the_log_it_reads(cell: Cell) -> None:
    before = cell.path.read_bytes()
    for target in (cell.path, Path(f"{cell.path}-wal"), Path(f"{cell.path}-shm")):
        for force in ((), ("--force",)):
            done = agent("log", "export", "--db", cell.path, "--output", target, *force)
            assert done.returncode == 2, (target, force)
            assert "is the log being read" in one_error_line(done.stderr)
    assert cell.path.read_bytes() == before
    assert_verifies(cell.path, 1, cell.last.last_seq)


def test_log_export_never_makes_a_file_sqlite_would_take_for_a_logs_journal(cell: Cell, tmp_path: Path) -> None:
    """A new file named like another log's journal would be taken for a hot journal by every
    reader of that log (a running agent's, say) and stop them all."""
    other = make_log(tmp_path / "other" / "events.db", orders=2)
    for tail in ("-journal", "-wal", "-shm"):
        target = Path(f"{other}{tail}")
        done = agent("log", "export", "--db", cell.path, "--output", target)
        assert done.returncode == 2, (tail, done.stderr)
        assert f"SQLite would read {target} as part of {other}" in one_error_line(done.stderr)
        assert not target.exists()
    assert agent("status", "--db", other).returncode == 0


def test_log_export_overwrites_only_with_force(cell: Cell, tmp_path: Path) -> None:
    target = tmp_path / "export.jsonl"
    assert agent("log", "export", "--db", cell.path, "--output", target).returncode == 0
    yesterday = target.read_text()
    done = agent("log", "export", "--db", cell.path, "--output", target)
    assert done.returncode == 2
    assert f"{target} exists; use --force to replace it" in one_error_line(done.stderr)
    assert target.read_text() == yesterday

    target.write_text(yesterday.splitlines()[0] + "\n")  # an earlier, shorter export
    forced = agent("log", "export", "--db", cell.path, "--output", target, "--force")
    assert forced.returncode == 0, forced.stderr
    assert json_lines(target.read_text()) == stored_events(cell.path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert agent("log", "export", "--db", cell.path, "--output", empty, "--force").returncode == 0
    assert json_lines(empty.read_text()) == stored_events(cell.path)


def fingerprint(path: Path) -> tuple[int, int, bytes]:
    """(inode, type and mode, content) of a file: the same only if nothing replaced or wrote it."""
    found = path.lstat()
    content = path.read_bytes() if stat.S_ISREG(found.st_mode) else b""
    return found.st_ino, found.st_mode, content


def test_log_export_force_replaces_nothing_but_an_earlier_export(cell: Cell, tmp_path: Path) -> None:
    """Not another agent's log, its journal, a data folder's lock, a device, a fifo or a stranger's file."""
    other_dir = tmp_path / "other"
    with Journal.open(other_dir / "events.db", synchronous="normal") as journal:
        run(journal, cmd.ConfigurePlant(STATIONS, PRODUCTS), FakeClock(T0))
    other_log = other_dir / "events.db"
    wal = tmp_path / "wal" / "events.db-wal"
    wal.parent.mkdir()
    shutil.copy(other_log, wal.parent / "events.db")
    wal.touch()  # a checkpointed WAL is empty, yet SQLite's
    notes = tmp_path / "notes.txt"
    notes.write_text("not an export\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    targets = [other_log, wal, notes, fifo]
    if os.geteuid() == 0:
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        targets.append(device)
    with DataDirLock(other_dir):  # a running agent's lock
        lock = other_dir / LOCK_NAME
        targets.append(lock)
        before = {target: fingerprint(target) for target in targets}
        for target in targets:
            for force in ((), ("--force",)):
                done = agent("log", "export", "--db", cell.path, "--output", target, *force)
                assert done.returncode == 2, (target, done.stderr)
                assert "--force replaces only a file this command wrote" in one_error_line(done.stderr), target
        assert {target: fingerprint(target) for target in targets} == before
        assert holder(other_dir) is not None
    assert_verifies(other_log, 1, 1)


def test_log_export_to_a_folder_is_one_line(cell: Cell, tmp_path: Path) -> None:
    for force in ((), ("--force",)):
        done = agent("log", "export", "--db", cell.path, "--output", tmp_path, *force)
        assert done.returncode == 2, done.stderr
        assert f"{tmp_path} is a folder" in one_error_line(done.stderr)
    assert tmp_path.is_dir()


def test_log_export_never_follows_a_symlink(cell: Cell, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours\n")
    link = tmp_path / "export.jsonl"
    link.symlink_to(elsewhere)
    done = agent("log", "export", "--db", cell.path, "--output", link)
    assert done.returncode == 2
    assert "is a symlink" in one_error_line(done.stderr)
    assert elsewhere.read_text() == "not yours\n"

    to_the_log = tmp_path / "sneaky.jsonl"
    to_the_log.symlink_to(cell.path)
    refused = agent("log", "export", "--db", cell.path, "--output", to_the_log, "--force")
    assert refused.returncode == 2
    assert "is the log being read" in one_error_line(refused.stderr)

    forced = agent("log", "export", "--db", cell.path, "--output", link, "--force")  # neither followed nor replaced
    assert forced.returncode == 2
    assert "is a symlink" in one_error_line(forced.stderr)
    assert link.is_symlink()
    assert elsewhere.read_text() == "not yours\n"


def test_log_export_into_a_missing_folder_is_one_line(cell: Cell, tmp_path: Path) -> None:
    target = tmp_path / "no-such-folder" / "export.jsonl"
    done = agent("log", "export", "--db", cell.path, "--output", target)
    assert done.returncode == 2
    assert f"folder {target.parent} does not exist" in one_error_line(done.stderr)
    assert not target.parent.exists()


def test_an_export_is_private_whatever_the_umask(cell: Cell, tmp_path: Path) -> None:
    target = tmp_path / "export.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "log", "export", "--db", str(cell.path), "--output", str(target)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        umask=0,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


# -- log compact -----------------------------------------------------------------------------------------------------


def status_json(path: Path) -> dict[str, Any]:
    result = cli("status", "--db", path, "--json")
    assert result.exit_code == 0, result.output
    return timeless(json_lines(result.stdout)[0])


def assert_verifies(path: Path, first_seq: int, last_seq: int) -> None:
    result = cli("log", "verify", "--db", path, "--json")
    assert result.exit_code == 0, result.output
    verdict = json_lines(result.stdout)[0]
    assert (verdict["ok"], verdict["first_seq"], verdict["last_seq"]) == (True, first_seq, last_seq)


def newest_snapshot(path: Path) -> int:
    with EventLog(path, readonly=True) as log_:
        return log_.snapshot_seqs()[-1]


def test_log_compact_archive(cell: Cell) -> None:
    before = status_json(cell.path)
    exported = stored_events(cell.path)
    cut = newest_snapshot(cell.path)
    assert 1 < cut < cell.last.last_seq

    result = cli("log", "compact", "--db", cell.path, "--retention", "archive")
    assert result.exit_code == 0, result.output
    assert f"removed {cut} events" in result.stdout

    archive_dir = cell.path.parent / "archive"
    (archive,) = archive_dir.iterdir()
    assert archive.name.endswith(".jsonl.gz")
    assert archive.name in result.stdout
    with gzip.open(archive, "rt") as lines:
        archived = [json.loads(line) for line in lines]
    assert archived == exported[:cut]  # exactly the removed events, with their hashes
    assert stored_events(cell.path) == exported[cut:]

    assert_verifies(cell.path, cut + 1, cell.last.last_seq)
    assert status_json(cell.path) == before
    assert replayed(cell) == state_view(cell.last)

    again = cli("log", "compact", "--db", cell.path, "--retention", "archive")
    assert again.exit_code == 0
    assert "nothing to compact" in again.stdout
    assert list(archive_dir.iterdir()) == [archive]


def test_log_compact_drop(cell: Cell) -> None:
    before = status_json(cell.path)
    exported = stored_events(cell.path)
    cut = newest_snapshot(cell.path)

    result = cli("log", "compact", "--db", cell.path, "--retention", "drop")
    assert result.exit_code == 0, result.output
    assert not (cell.path.parent / "archive").exists()
    assert stored_events(cell.path) == exported[cut:]
    assert_verifies(cell.path, cut + 1, cell.last.last_seq)
    assert status_json(cell.path) == before


def test_log_compact_keep_and_the_configured_retention(cell: Cell, tmp_path: Path) -> None:
    exported = stored_events(cell.path)
    keep = cli("log", "compact", "--db", cell.path, "--retention", "keep")
    assert keep.exit_code == 0, keep.output
    assert "nothing to compact" in keep.stdout
    assert stored_events(cell.path) == exported

    config = tmp_path / "cell.yaml"
    config.write_text("data_dir: data\nlog:\n  retention: drop\n")
    configured = cli("log", "compact", "--config", config)  # no --db, no --retention: both from the config
    assert configured.exit_code == 0, configured.output
    assert configured.stdout.startswith("drop:")
    assert stored_events(cell.path) == exported[newest_snapshot(cell.path) :]
    assert not (cell.path.parent / "archive").exists()


# -- an archive as --db ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archived:
    path: Path  # the archive `log compact` wrote
    events: list[dict[str, Any]]  # the events it holds, as `log export` writes them
    text: list[str]  # `log show` of them, read from the log before it was compacted


@pytest.fixture
def archived(cell: Cell) -> Archived:
    cut = newest_snapshot(cell.path)
    events = stored_events(cell.path)[:cut]
    text = cli("log", "show", "--db", cell.path, "--to", str(cut)).stdout.splitlines()
    assert cli("log", "compact", "--db", cell.path, "--retention", "archive").exit_code == 0
    (path,) = (cell.path.parent / "archive").iterdir()
    return Archived(path, events, text)


def write_archive(path: Path, events: list[dict[str, Any]]) -> None:
    with gzip.open(path, "wb") as archive:
        for event in events:
            archive.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")


def test_log_show_reads_an_archive_as_it_reads_a_log(archived: Archived, tmp_path: Path) -> None:
    def shown(path: Path, *args: str) -> list[dict[str, Any]]:
        result = cli("log", "show", "--db", path, "--json", *args)
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    events = [without_hash(e) for e in archived.events]
    assert shown(archived.path) == events
    assert shown(archived.path, "--from", "5", "--to", "9") == events[4:9]
    assert shown(archived.path, "--type", "OrderAccepted") == [e for e in events if e["type"] == "OrderAccepted"]
    assert shown(archived.path, "--subject", "o1") == [e for e in events if e["subject"] == "o1"]
    assert cli("log", "show", "--db", archived.path).stdout.splitlines() == archived.text

    renamed = tmp_path / "events-copy.db"  # known by what it holds, not by its name
    shutil.copyfile(archived.path, renamed)
    assert shown(renamed) == events


def test_log_verify_checks_an_archive_within_itself(archived: Archived, tmp_path: Path) -> None:
    result = cli("log", "verify", "--db", archived.path, "--json")
    assert result.exit_code == 0, result.output
    (verdict,) = json_lines(result.stdout)
    last = archived.events[-1]["seq"]
    assert (verdict["ok"], verdict["first_seq"], verdict["last_seq"], verdict["events"]) == (True, 1, last, last)
    assert verdict["unchecked"] is None  # its first event chains to the log's start: checked too
    text = cli("log", "verify", "--db", archived.path)
    assert text.exit_code == 0
    assert text.stdout.startswith(f"ok: archived events 1..{last}")

    # An archive from later in a log: its first event's link to the one before cannot be checked, and it says so.
    write_archive(tmp_path / "later.jsonl.gz", archived.events[5:])
    later = cli("log", "verify", "--db", tmp_path / "later.jsonl.gz", "--json")
    assert later.exit_code == 0, later.output
    (verdict,) = json_lines(later.stdout)
    assert (verdict["ok"], verdict["first_seq"], verdict["last_seq"], verdict["events"]) == (True, 6, last, last - 5)
    assert "event 6's link to the event before it is not checked" in verdict["unchecked"]
    later_text = cli("log", "verify", "--db", tmp_path / "later.jsonl.gz")
    assert "event 6's link to the event before it is not checked" in flat(later_text.stdout)

    edited = [dict(e) for e in archived.events]
    edited[3]["subject"] = "o9"
    write_archive(tmp_path / "edited.jsonl.gz", edited)
    done = agent("log", "verify", "--db", tmp_path / "edited.jsonl.gz", "--json")
    assert done.returncode == 1
    assert "seq 4" in one_error_line(done.stderr)
    assert json.loads(done.stdout)["fault"]["seq"] == 4

    write_archive(tmp_path / "gap.jsonl.gz", archived.events[:5] + archived.events[6:])
    done = agent("log", "verify", "--db", tmp_path / "gap.jsonl.gz")
    assert done.returncode == 1
    assert "seq 6: event missing" in one_error_line(done.stderr)


def test_a_damaged_archive_is_one_line(archived: Archived, tmp_path: Path) -> None:
    cut_short = tmp_path / "cut-short.jsonl.gz"
    cut_short.write_bytes(archived.path.read_bytes()[:-40])  # a copy that stopped early
    shown = agent("log", "show", "--db", cut_short)
    assert shown.returncode == 1
    assert "the file is damaged" in one_error_line(shown.stderr)
    verified = agent("log", "verify", "--db", cut_short)
    assert verified.returncode == 1
    assert "the file is damaged" in one_error_line(verified.stderr)


@pytest.mark.parametrize(
    "command",
    [("status",), ("log", "replay"), ("log", "export"), ("log", "compact", "--retention", "drop")],
    ids=" ".join,
)
def test_any_other_command_given_an_archive_says_what_reads_one(archived: Archived, command: tuple[str, ...]) -> None:
    before = archived.path.read_bytes()
    done = agent(*command, "--db", archived.path)
    assert done.returncode == 2
    assert "an archive holds events only; use log show or log verify" in one_error_line(done.stderr)
    assert done.stdout == ""
    assert archived.path.read_bytes() == before
    assert sorted(p.name for p in archived.path.parent.iterdir()) == [archived.path.name]  # nothing made beside it


# -- profile list ----------------------------------------------------------------------------------------------------


def test_profile_list_without_a_config_says_which_config_it_used(tmp_path: Path) -> None:
    """Not an empty table: no config file here, so the default profile folder, which is not here either."""
    done = agent("profile", "list")
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "no profiles in device_profiles/" in line
    assert "config: none found (config.yaml, /etc/edge-agent/config.yaml)" in line
    assert "--config" in line
    assert done.stdout == ""


def test_profile_list_names_the_config_it_used(tmp_path: Path) -> None:
    config = tmp_path / "cell.yaml"
    config.write_text(f"profile: {PROFILE}\n")
    done = agent("profile", "list", "--config", config, env=subprocess_env(COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"config: {config}; profile: {PROFILE}"
    assert "rpi-2station" in done.stdout


def test_profile_list_shows_whole_file_names_at_80_columns(tmp_path: Path) -> None:
    config = tmp_path / "cell.yaml"
    config.write_text(f"profile: {PROFILE}\n")
    done = agent("profile", "list", "--config", config, env=subprocess_env(COLUMNS="80"))
    assert done.returncode == 0, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines()[1:])  # the table, below the config line
    assert f"Profiles in {PROFILE.parent}/" in done.stdout
    for path in PROFILE.parent.glob("*.yaml"):
        assert path.name in done.stdout
    assert "…" not in done.stdout


# -- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [("status",), ("log", "show"), ("log", "compact", "--retention", "drop")], ids=" ".join
)
def test_a_missing_log_is_a_one_line_usage_error(tmp_path: Path, command: tuple[str, ...]) -> None:
    missing = tmp_path / "typo" / "evnets.db"
    done = agent(*command, "--db", missing)
    assert done.returncode == 2
    assert str(missing) in one_error_line(done.stderr)
    assert done.stdout == ""
    assert not missing.exists(), "a typo must not create an empty log"


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ('mqtt: {port: "abc"}\n', "mqtt.port"),
        ("device_id: cell-01\nbogus: 1\n", "bogus"),
        ("log:\n  retension: drop\n", "log.retension"),
    ],
    ids=["ill-typed", "unknown-key", "unknown-nested-key"],
)
def test_an_invalid_config_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    done = agent("status", "--config", config)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert key in line
    assert "bad.yaml" in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("frobnicate",), "No such command 'frobnicate'"),
        (("order", "submit", "widget-a", "abc", "--warehouse", "WH1"), "Invalid value for 'qty'"),
        (("order", "submit", "widget-a", "3"), "Missing option '--warehouse'"),
        (("log", "replay", "--to", "abc"), "Invalid value for '--to'"),
        (("log", "export", "--format", "csv"), "Invalid value for '--format'"),
        (("log", "show", "--nope"), "No such option: --nope"),
    ],
    ids=["command", "argument", "missing-option", "option-value", "choice", "option"],
)
def test_a_usage_error_is_one_line_exit_2(args: tuple[str, ...], says: str) -> None:
    done = agent(*args)
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert says in line
    assert line.endswith("--help')")
    assert done.stdout == ""


def test_help_and_version_still_exit_as_before() -> None:
    for args in (("--help",), ("log", "show", "--help"), ("order", "submit", "--help")):
        done = agent(*args)
        assert done.returncode == 0, args
        assert "Usage:" in done.stdout
        assert done.stderr == ""
    version = agent("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"edge-agent {__version__}")
    bare = agent("log")  # a group without a command: its help
    assert bare.returncode == 2
    assert "Usage:" in bare.stdout
    assert "show" in bare.stdout


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    done = agent("--debug", "status", "--db", missing)
    assert done.returncode != 0
    assert "Traceback (most recent call last)" in done.stderr
    assert f"ConfigError: no log at {missing}" in done.stderr


def test_debug_keeps_the_exit_code() -> None:
    """--debug adds the traceback but keeps the exit code (2 for a usage or config error)."""
    done = agent("--debug", "status", "--db", "nope.db")
    assert "Traceback" in done.stderr
    assert done.returncode == 2
