"""The whole agent killed with SIGKILL at chosen points of an order's life, then restarted.

A child process (tests/support/crash_agent.py) runs the Agent on the simulated
profile, submits the same nine orders every time and prints every commit as it
happens. For each kill point the test starts it on a fresh data dir, reads its
lines until the point is reached and kills it at once; then starts it again on
the same data dir, kills it again, and lets the last run finish.

Two kinds of kill:
- lockstep: the child waits for a reply after each commit line, so the kill
  lands exactly after the commit the test chose and the log must end there;
- free: the child runs on, so the kill lands wherever it has got to by then.

After every kill the log must be intact and recover to its replay; after the
last run every order has been accepted, issued and tidied up exactly once,
inventory ids are INV00001.. with no gap or repeat, and the last run's output
pins show that nothing came on before the agent had recovered the log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest

from edge_agent.domain.events import Recorded
from edge_agent.domain.evolve import fold
from edge_agent.domain.outputs import desired_outputs
from edge_agent.domain.state import Stage, State, inventory_id
from edge_agent.log.journal import Journal
from edge_agent.log.store import EventLog
from edge_agent.log.verify import verify
from edge_agent.workflow.steps import STEP_NAMES
from tests.support import ROOT
from tests.support.crash_agent import ORDERS, SNAPSHOT_EVERY
from tests.support.crash_writer import canonical

SPEED = 20  # timeouts scale too: a unit may take 0.5 s, a transit 0.75 s before a retry
# Events that every order has exactly once, however often the agent was killed.
ONCE_PER_ORDER = (
    "OrderAccepted",
    "StationAssigned",
    "BuildComplete",
    "ShipmentStarted",
    "ShipmentArrived",
    "InventoryIssued",
    "TidiedUp",
)


# -- the child's lines ------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    """One `commit` line: the events of one transaction, as (type, subject, detail)."""

    first: int
    last: int
    events: tuple[tuple[str, str, str], ...]

    @classmethod
    def parse(cls, line: str) -> Commit:
        word, first, last, *tokens = line.split()
        assert word == "commit", f"not a commit line: {line!r}"
        events = []
        for text in tokens:
            type_, subject, detail = [*text.split(":", 2), "", ""][:3]
            events.append((type_, subject, detail))
        return cls(int(first), int(last), tuple(events))

    def subjects(self, type_: str, detail: str | None = None) -> list[str]:
        return [s for t, s, d in self.events if t == type_ and (detail is None or d == detail)]


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: `at` gives the order a commit reaches this point for (or None);
    `between` tells whether a state recovered right after that commit is in the gap."""

    name: str
    at: Callable[[Commit], str | None]
    between: Callable[[State, str], bool]


def _first(orders: list[str]) -> str | None:
    return orders[0] if orders else None


def _unit_not_last(commit: Commit) -> str | None:
    complete = set(commit.subjects("BuildComplete"))
    return _first([o for o in commit.subjects("UnitBuilt") if o not in complete])


def _mid_build(state: State, order_id: str) -> bool:
    item = state.work_items.get(order_id)
    return item is not None and item.stage is Stage.FACTORY_ACCEPTED and 0 < item.units_done < item.qty


def _mid_shipment(state: State, order_id: str) -> bool:
    item = state.work_items.get(order_id)
    return item is not None and item.stage is Stage.MOVE_TO_WAREHOUSE and state.lane.order_id == order_id


def _issued_not_tidied(state: State, order_id: str) -> bool:
    item = state.work_items.get(order_id)
    return item is not None and item.inventory_id is not None and "publish_inventory" not in item.steps_done


MID_BUILD = KillPoint("mid-build", _unit_not_last, _mid_build)
MID_SHIPMENT = KillPoint("mid-shipment", lambda c: _first(c.subjects("ShipmentStarted")), _mid_shipment)
ISSUED = KillPoint("inventory-issued", lambda c: _first(c.subjects("InventoryIssued")), _issued_not_tidied)


@dataclass(frozen=True)
class Kill:
    point: KillPoint
    lockstep: bool  # exactly after the commit (True) or wherever the child has got to (False)


SCENARIOS = {
    "mid-build": (Kill(MID_BUILD, True), Kill(MID_BUILD, True), Kill(MID_BUILD, False)),
    "mid-shipment": (Kill(MID_SHIPMENT, True), Kill(MID_SHIPMENT, True), Kill(MID_SHIPMENT, False)),
    # ShipmentArrived + InventoryIssued commit together; then steps 3, 4 and 5 with TidiedUp in one more.
    "arrival-to-tidy-up": (Kill(ISSUED, True), Kill(ISSUED, True), Kill(ISSUED, False)),
}


# -- the child process ---------------------------------------------------------------


class Child:
    """One run of tests/support/crash_agent.py."""

    def __init__(self, data_dir: Path, stderr: TextIO, *, lockstep: bool, out: Path | None = None) -> None:
        args = [sys.executable, "-m", "tests.support.crash_agent", str(data_dir), "--speed", str(SPEED)]
        args += ["--lockstep"] if lockstep else []
        args += ["--out", str(out)] if out else []
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        self.stderr = stderr
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE if lockstep else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )

    def line(self) -> str:
        """The child's next line; fails the test (with its stderr) if it ended instead."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.endswith("\n"):
            self.proc.wait()
            self.fail(f"the agent process ended on its own (exit {self.proc.returncode})")
        return line

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def ready(self) -> int:
        """The seq the child recovered to; no output may be on at that moment."""
        word, seq, on = self.line().split()
        assert word == "ready"
        assert on == "-", f"outputs on right after recovery, before anything resumed: {on}"
        return int(seq)

    def kill(self) -> None:
        self.proc.kill()
        if self.proc.wait() != -signal.SIGKILL:
            self.fail(f"the agent process exited on its own (exit {self.proc.returncode}) before the kill")

    def fail(self, message: str) -> None:
        self.stderr.flush()
        text = Path(self.stderr.name).read_text(encoding="utf-8")
        pytest.fail(f"{message}\n--- its stderr ---\n{text[-4000:]}")


@pytest.fixture
def crash_agents(tmp_path: Path, children: list[subprocess.Popen[str]]) -> Iterator[Callable[..., Child]]:
    """Starts crash agent processes (`start(data_dir, lockstep=...)`); `children` ends them."""
    with (tmp_path / "agent-stderr.txt").open("a", encoding="utf-8") as stderr:

        def start(data_dir: Path, *, lockstep: bool, out: Path | None = None) -> Child:
            child = Child(data_dir, stderr, lockstep=lockstep, out=out)
            children.append(child.proc)
            return child

        yield start


# -- the log ---------------------------------------------------------------------


@dataclass(frozen=True)
class Log:
    records: list[Recorded]
    state: State  # the replay from seq 1, snapshots ignored

    def of(self, type_: str) -> list[Any]:
        return [r.event for r in self.records if type(r.event).__name__ == type_]


def check_log(events_db: Path) -> Log:
    """What must hold of the file whenever the agent is down, killed or not."""
    with EventLog(events_db, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None, f"verify found a fault: {verdict.fault}"
        rows = list(log_.rows())
        assert [row.seq for row in rows] == list(range(1, len(rows) + 1)), "seqs are not 1, 2, 3 ... with no gap"
        records = [row.decode() for row in rows]
        replayed = fold(State(), records)
        assert log_.snapshot_seqs(), "no snapshot taken: recovery did not go through one"
        # The agent's own recovery (newest snapshot + the tail) gives what replay from seq 1 gives.
        with Journal.open(events_db, snapshot_every=SNAPSHOT_EVERY) as journal:
            assert canonical(journal.state) == canonical(replayed), "recovered state differs from the replay"
    log = Log(records, replayed)
    issued = [e.inventory_id for e in log.of("InventoryIssued")]
    assert issued == [inventory_id(n) for n in range(1, len(issued) + 1)], f"inventory ids repeat or skip: {issued}"
    assert replayed.inventory_seq == len(issued)
    for type_ in ONCE_PER_ORDER:
        repeated = [o for o, n in Counter(e.order_id for e in log.of(type_)).items() if n > 1]
        assert not repeated, f"{type_} more than once for {repeated}"
    steps = Counter((e.order_id, e.step) for e in log.of("StepCompleted"))
    assert all(n == 1 for n in steps.values()), f"a step completed twice: {[k for k, n in steps.items() if n > 1]}"
    assert not log.of("OrderFailed") + log.of("OrderCancelled") + log.of("OrderRejected"), "an order went wrong"
    return log


def check_final(log: Log) -> None:
    """Every order was done exactly once, by the same steps in the same order."""
    order_ids = {o.order_id for o in ORDERS}
    assert not log.state.work_items, f"left over: {sorted(log.state.work_items)}"
    assert log.state.accepted == len(order_ids)
    assert log.state.inventory_seq == len(ORDERS)
    for type_ in ONCE_PER_ORDER:
        assert sorted(e.order_id for e in log.of(type_)) == sorted(order_ids), f"{type_} not once per order"
    units = Counter(e.order_id for e in log.of("UnitBuilt"))
    assert units == {o.order_id: o.qty for o in ORDERS}, "units counted twice or lost"
    for order_id in order_ids:
        steps = [(e.step, e.name) for e in log.of("StepCompleted") if e.order_id == order_id]
        assert steps == list(enumerate(STEP_NAMES)), f"{order_id}: steps {steps}"
    assert len(log.of("AgentStopped")) == 1, "only the last run stopped in order"


def check_outputs(report: dict[str, Any], log: Log) -> None:
    """From the last run's pins: everything off at first and at recovery; on only after its event."""
    started = report["started_seq"]
    started_at = [r.seq for r in log.records if type(r.event).__name__ == "AgentStarted"][-1]
    assert started_at <= started, "the last run did not start with AgentStarted"
    for name, history in report["pins"].items():
        recovered = report["at_recovery"][name]
        assert history[0][1] is False, f"{name} was on when it was created"
        assert [on for _, on in recovered] == [False] * len(recovered), f"{name} on before recovery: {recovered}"
        assert history[: len(recovered)] == recovered
        first_on = next((i for i, (_, on) in enumerate(history) if on), None)
        assert first_on is None or first_on >= len(recovered), f"{name} came on before the agent had recovered"
        assert history[-1][1] is False, f"{name} still on after the orderly stop"
    # Every switch on follows the committed state that calls for it.
    wanted: dict[int, dict[str, bool]] = {}
    state = State()
    positions = {seq for _, _, seq in report["switches"]}
    for record in log.records:
        state = fold(state, [record])
        if record.seq in positions:
            wanted[record.seq] = desired_outputs(state)
    assert report["switches"], "no output ever switched in the last run"
    for name, on, seq in report["switches"]:
        assert seq >= started, f"{name} switched at seq {seq}, before recovery ended at {started}"
        if on:
            assert wanted[seq][name], f"{name} came on at seq {seq} although the log did not call for it"
    assert any(on for name, on, _ in report["switches"] if name != "status_led"), "nothing resumed"


# -- the test ----------------------------------------------------------------------


def run_until_killed(child: Child, kill: Kill, head: int, events_db: Path) -> tuple[int, str]:
    """Read the child's commits until `kill.point`, kill it there; returns the new head and the order."""
    ready = child.ready()
    assert ready > head, "the restart logged nothing"
    while True:
        commit = Commit.parse(child.line())
        order_id = kill.point.at(commit)
        if order_id is not None:
            child.kill()
            break
        if kill.lockstep:
            child.go_on()
    log = check_log(events_db)
    start = log.records[head]
    assert type(start.event).__name__ == "AgentStarted", f"seq {start.seq}: the run began with {start.event}"
    new_head = log.records[-1].seq
    if kill.lockstep:
        assert new_head == commit.last, f"{kill.point.name}: the log went on to {new_head} past {commit.last}"
        assert kill.point.between(log.state, order_id), f"{kill.point.name}: {log.state.work_items.get(order_id)}"
    else:
        assert new_head >= commit.last, f"acknowledged events lost: the log ends at {new_head} < {commit.last}"
    return new_head, order_id


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_agent_killed_resumes_every_order_exactly_once(
    tmp_path: Path, scenario: str, crash_agents: Callable[..., Child]
) -> None:
    """Three kills around one point of an order's life, then a run to the end: the log
    holds every order exactly once and the last run's outputs came on only after recovery."""
    data_dir = tmp_path / "data"
    events_db = data_dir / "events.db"
    head = 0
    for kill in SCENARIOS[scenario]:
        head, order_id = run_until_killed(crash_agents(data_dir, lockstep=kill.lockstep), kill, head, events_db)
        print(f"{scenario}: killed {'exactly' if kill.lockstep else 'soon'} after {kill.point.name} of {order_id}")

    out = tmp_path / "outputs.json"
    last = crash_agents(data_dir, lockstep=False, out=out)
    assert last.ready() > head
    while not last.line().startswith("done"):
        pass
    assert last.proc.wait(timeout=30) == 0
    log = check_log(events_db)
    check_final(log)
    check_outputs(json.loads(out.read_text(encoding="utf-8")), log)
    assert len(log.of("AgentStarted")) == len(SCENARIOS[scenario]) + 1
