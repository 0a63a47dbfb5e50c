"""Power cuts, not process kills: what the disk holds when the power goes out mid-write.

The log runs on `tests/support/power.py`'s disk, where writes since the last fsync
are lost or torn at the cut, after a random number of I/O operations. Two writers:

- the whole `Agent` (its log routed to that disk, as it opens its own), the simulated
  cell building orders offered through `Agent.offer`, whose callback is the MQTT
  acknowledgement: the broker delivers again, at the next run, what never was;
- its log code alone (`EventLog`, `Journal`, `Workflow`, the orders taken as a group
  as `Agent` takes them), dense in commits, snapshots and checkpoints.

After every cut the standard library's SQLite (another library than apsw's, the same
files) checks what is left: `PRAGMA integrity_check`, the hash chain (`log verify`),
every commit that returned (and so was acted on) and every acknowledged order still
there. With `synchronous=full` none may be missing, and at the end the agent takes the
log over and builds every order exactly once. With `normal` some are lost: why `full`
is the default.

A compaction with `--retention archive` is cut at each of its I/O operations in
turn: the log's old events are never gone without their archive, complete.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.agent import Agent, plant_command
from edge_agent.clock import SystemClock
from edge_agent.config import Config
from edge_agent.devices.profile import load_profile
from edge_agent.domain import commands as cmd
from edge_agent.domain.events import InventoryIssued, Recorded
from edge_agent.domain.state import inventory_id
from edge_agent.log import archive
from edge_agent.log.compact import Retention, compact
from edge_agent.log.journal import Commit, Journal, replay
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Synchronous
from edge_agent.log.verify import verify
from edge_agent.workflow.engine import Workflow
from tests.support import PROFILE, WAIT_S, chaos_seed
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order
from tests.support.power import Power, PowerCut, routing

CUTS = 300
MAX_ORDERS = 40  # over all the runs: the agent then builds them all
MAX_OPERATIONS = 90  # a run is cut within this many I/O operations (a commit takes about seven)
SNAPSHOT_EVERY = 5  # snapshots often, so that cuts land in them too
AGENT_CUTS = 300
AGENT_ORDERS = 150  # about one for every two runs: the cuts land among orders being built
AGENT_MAX_OPERATIONS = 100
SPEED = 50  # the simulated cell: a unit in 0.02 s, a transit in 0.06 s
CHECKPOINT_PAGES = 20  # and checkpoints (SQLite's default is 1000 pages), which write the database file


@dataclass
class Cell:
    """The writer's side across power cuts: every commit that returned (the agent acts
    on it: outputs, MQTT acknowledgements), the orders acknowledged, and those the
    broker still holds because they never were."""

    path: Path
    synchronous: Synchronous
    rng: random.Random
    committed: list[Recorded] = field(default_factory=list)  # the last event of each commit
    acknowledged: set[str] = field(default_factory=set)
    unacknowledged: deque[cmd.SubmitOrder] = field(default_factory=deque)
    orders: int = MAX_ORDERS  # to send over all the runs
    sent: int = 0

    def run_until_cut(self) -> None:
        """One run of the writer on a disk whose power is cut after a random number of operations."""
        with Power(self.rng, cut_after=self.rng.randint(1, MAX_OPERATIONS)) as power:
            log_ = None
            try:
                log_ = EventLog(self.path, synchronous=self.synchronous, connect=partial(checkpointing, power))
                journal = Journal(log_, replay(log_), SNAPSHOT_EVERY)
                journal.add_observer(self._committed)
                self._work(Workflow(journal, SystemClock()))
            except Exception:
                if not power.cut:
                    raise
            finally:
                if log_ is not None:
                    with suppress(PowerCut):  # the dead connection cannot write its last checkpoint
                        log_.close()
            assert power.cut, "the run ended without a power cut"

    def _committed(self, commit: Commit) -> None:
        self.committed.append(commit.records[-1])

    async def run_agent_until_cut(self, config: Config) -> None:
        """One run of the whole agent (the control loop, the simulated machine, orders offered
        and acknowledged through `Agent.offer`) until the power is cut."""
        cut_after = self.rng.randint(1, AGENT_MAX_OPERATIONS)
        with Power(self.rng, cut_after) as power, routing(config.events_db, partial(checkpointing, power)):
            try:
                async with Agent(config) as agent:
                    await self._drive(agent, power)
            except Exception:  # the cut, wherever it met the agent (at start, in a commit, at stop)
                if not power.cut:
                    raise
            assert power.cut, "the run ended without a power cut"

    async def _drive(self, agent: Agent, power: Power) -> None:
        faulted = asyncio.Event()  # a commit failed: the agent now only tries the disk again
        agent.storage.add_observer(lambda fault: faulted.set() if fault else None)
        changed = asyncio.Event()  # a commit or an acknowledgement
        agent.add_observer(partial(self._agent_committed, agent, changed))
        for waiting in list(self.unacknowledged):  # the broker delivers them again
            self._offer(agent, waiting, changed)
        run = asyncio.create_task(agent.run())
        waits = [asyncio.create_task(faulted.wait()), asyncio.create_task(self._feed(agent, changed))]
        await asyncio.wait([run, *waits], return_when=asyncio.FIRST_COMPLETED)
        power.cut_now()  # if every order was built first, the power goes out while the cell waits
        for task in (run, *waits):
            task.cancel()
        await asyncio.gather(run, *waits, return_exceptions=True)

    async def _feed(self, agent: Agent, changed: asyncio.Event) -> None:
        """Another order whenever the cell is idle; returns once every order is built."""
        while True:
            changed.clear()
            if not agent.state.work_items and not self.unacknowledged:
                if self.sent == self.orders:
                    return
                self._new_order(agent, changed)
            await changed.wait()

    def _agent_committed(self, agent: Agent, changed: asyncio.Event, commit: Commit) -> None:
        self._committed(commit)
        changed.set()
        if self.rng.random() < 0.2:  # orders arrive while the cell works
            self._new_order(agent, changed)

    def _new_order(self, agent: Agent, changed: asyncio.Event) -> None:
        if self.sent < self.orders:
            self.unacknowledged.append(order(f"order-{self.sent:03d}", 1 + self.sent % 3))
            self.sent += 1
            self._offer(agent, self.unacknowledged[-1], changed)

    def _offer(self, agent: Agent, offered: cmd.SubmitOrder, changed: asyncio.Event) -> None:
        def acknowledge(events: list[Recorded]) -> None:  # the MQTT acknowledgement
            self.acknowledged.add(offered.order_id)
            with suppress(ValueError):
                self.unacknowledged.remove(offered)
            changed.set()

        agent.offer(offered, acknowledge)

    def _work(self, workflow: Workflow) -> None:
        """What the agent does at start, then orders and e-stop changes until the power goes out."""
        workflow.check()
        workflow.execute(cmd.RecordStart(__version__, "simulated"))
        workflow.execute(plant_command(load_profile(PROFILE), 1.0))
        workflow.execute(cmd.ReleaseEstop())
        workflow.execute(cmd.RearmTimers())
        for _ in range(10_000):
            if self.rng.random() < 0.3:
                self._orders(workflow)
            else:
                estop = workflow.state.estop
                workflow.execute(cmd.ReleaseEstop() if estop else cmd.EngageEstop())
            workflow.advance()
        raise AssertionError("no power cut after 10000 commits")

    def _orders(self, workflow: Workflow) -> None:
        if self.sent < self.orders:
            self.unacknowledged.append(order(f"order-{self.sent:03d}", 1 + self.sent % 3))
            self.sent += 1
        batch = list(self.unacknowledged)
        workflow.execute_batch(batch)  # committed: each order is acknowledged now, and only now
        self.acknowledged.update(o.order_id for o in batch)
        self.unacknowledged.clear()

    def lost(self) -> tuple[list[Recorded], list[str]]:
        """Check the files as a power cut left them, with the standard library's SQLite;
        the commits that returned but are not in the log, and the acknowledged orders
        it does not know (forgotten here: the broker will not deliver them again)."""
        with closing(sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with EventLog(self.path, readonly=True) as log_:
            verdict = verify(log_)
            assert verdict.fault is None, verdict.fault
            rows = {row.seq: row for row in log_.rows()}
            orders_lost = sorted(i for i in self.acknowledged if log_.order_record(i) is None)
        lost = [
            record
            for record in self.committed
            if (row := rows.get(record.seq)) is None or (row.ts, row.type) != (record.ts, type(record.event).__name__)
        ]
        self.committed = [record for record in self.committed if record not in lost]
        self.acknowledged.difference_update(orders_lost)
        return lost, orders_lost


def checkpointing(power: Power, path: Path) -> sqlite3.Connection:
    db = power.connect(path)
    db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
    return db


def new_cell(tmp_path: Path, synchronous: Synchronous, seed: int) -> Cell:
    path = tmp_path / "data" / "events.db"
    EventLog(path).close()  # made whole (and fsynced) by the log itself, before any cut
    return Cell(path, synchronous, random.Random(seed))


def accepted_once(rows: Iterator[tuple[str, str]]) -> tuple[Counter[str], Counter[str]]:
    """How often each order was accepted, and how often it ended (issued, failed, cancelled)."""
    accepted: Counter[str] = Counter()
    ended: Counter[str] = Counter()
    for type_, subject in rows:
        if type_ == "OrderAccepted":
            accepted[subject] += 1
        elif type_ in {"InventoryIssued", "OrderFailed", "OrderCancelled"}:
            ended[subject] += 1
    return accepted, ended


@pytest.mark.chaos
def test_no_committed_event_is_lost_to_a_power_cut_with_synchronous_full(tmp_path: Path) -> None:
    seed = chaos_seed()
    cell = new_cell(tmp_path, "full", seed)
    for cut in range(CUTS):
        cell.run_until_cut()
        lost, orders_lost = cell.lost()
        assert not lost, f"seed {seed}, cut {cut + 1}: committed and acted on, then lost: {lost}"
        assert not orders_lost, f"seed {seed}, cut {cut + 1}: acknowledged, then lost: {orders_lost}"
    print(f"synchronous=full: {CUTS} cuts, {len(cell.committed)} commits, {len(cell.acknowledged)} orders, none lost")
    assert len(cell.committed) > 5 * CUTS  # the cuts landed among real work, not only at start-up
    assert cell.sent == cell.orders

    # The agent takes the log over (the standard library's SQLite again) and the broker
    # delivers again the orders never acknowledged: every order is built exactly once.
    asyncio.run(finish(cell))
    assert_built_once(cell)


async def finish(cell: Cell) -> None:
    config = agent_config(cell.path.parent, speed=SPEED, log={"snapshot_every": 10})
    async with Agent(config) as agent, running(agent):
        async with asyncio.timeout(WAIT_S):
            for redelivered in cell.unacknowledged:
                await agent.submit(redelivered)
            await agent.wait_until(lambda state: state.accepted == cell.orders and not state.work_items)


def assert_built_once(cell: Cell) -> None:
    """Every order sent accepted once and ended once, inventory ids without a gap or a
    repeat (SPEC: a power cut at any moment), and the log intact."""
    with EventLog(cell.path, readonly=True) as log_:
        assert verify(log_).fault is None
        accepted, ended = accepted_once((row.type, row.subject) for row in log_.rows())
        issued = [row.decode().event for row in log_.rows(type_="InventoryIssued")]
    assert [e.inventory_id for e in issued if isinstance(e, InventoryIssued)] == [
        inventory_id(n) for n in range(1, len(issued) + 1)
    ]
    orders = {f"order-{n:03d}" for n in range(cell.orders)}
    assert accepted == dict.fromkeys(orders, 1)
    assert ended == dict.fromkeys(orders, 1)


@pytest.mark.chaos
def test_the_agent_loses_no_acknowledged_order_to_power_cuts(tmp_path: Path) -> None:
    seed = chaos_seed()
    cell = new_cell(tmp_path, "full", seed)
    cell.orders = AGENT_ORDERS
    config = agent_config(cell.path.parent, speed=SPEED, log={"snapshot_every": 10})
    for cut in range(AGENT_CUTS):
        asyncio.run(cell.run_agent_until_cut(config))
        lost, orders_lost = cell.lost()
        assert not lost, f"seed {seed}, cut {cut + 1}: committed and acted on, then lost: {lost}"
        assert not orders_lost, f"seed {seed}, cut {cut + 1}: acknowledged, then lost: {orders_lost}"
    print(f"the agent: {AGENT_CUTS} cuts, {len(cell.committed)} commits, {len(cell.acknowledged)} orders, none lost")
    asyncio.run(finish(cell))
    assert_built_once(cell)


def test_synchronous_normal_loses_committed_events_to_power_cuts(tmp_path: Path) -> None:
    """Without an fsync at each commit, a cut takes back what the agent already acted on
    (the log itself stays intact: SQLite's WAL is consistent either way)."""
    cell = new_cell(tmp_path, "normal", chaos_seed())
    cuts_with_loss = orders_lost = 0
    for _ in range(40):  # over 25 seeds, 22 to 33 of the 40 cuts lost commits, 4 to 19 orders
        cell.run_until_cut()
        lost, orders = cell.lost()
        cuts_with_loss += bool(lost)
        orders_lost += len(orders)
    print(f"synchronous=normal: {cuts_with_loss} of 40 cuts lost commits, {orders_lost} acknowledged orders lost")
    assert cuts_with_loss >= 10
    assert orders_lost >= 1


# -- compaction with an archive ------------------------------------------------------


def compactable_log(folder: Path) -> tuple[Path, int]:
    """A log of 60 orders, snapshots every 10 events, all of it published: compaction
    removes everything up to its newest snapshot. Its path, and that snapshot's seq."""
    path = folder / "data" / "events.db"
    with Journal.open(path, snapshot_every=10) as journal:
        workflow = Workflow(journal, SystemClock())
        workflow.execute(plant_command(load_profile(PROFILE), 1.0))
        for n in range(60):
            workflow.execute_batch([order(f"order-{n:03d}")])
        journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
        return path, max(journal.log.snapshot_seqs())


def test_a_power_cut_during_compaction_never_removes_events_without_their_whole_archive(tmp_path: Path) -> None:
    template, snapshot_seq = compactable_log(tmp_path / "template")
    archives = tmp_path / "archives"
    operations = count_operations(template, archives)
    rng = random.Random(chaos_seed())
    outcomes: Counter[str] = Counter()
    for cut_after in range(1, operations + 1):
        for _ in range(3):  # each a different fate of the unsynced writes
            path = tmp_path / "cut" / "events.db"
            shutil.rmtree(tmp_path / "cut", ignore_errors=True)
            shutil.rmtree(archives, ignore_errors=True)
            shutil.copytree(template.parent, path.parent)
            with Power(rng, cut_after=cut_after) as power:
                log_ = EventLog(path, connect=power.connect)
                with pytest.raises(PowerCut):
                    compact(log_, Retention.archive, archives, files=power.files())
                with suppress(PowerCut):
                    log_.close()
            outcomes[after_cut(path, archives, snapshot_seq)] += 1
    print(f"compaction cut at each of its {operations} I/O operations, 3 times: {dict(outcomes)}")
    # The cuts landed before the archive, between it and the removal, and in the removal.
    assert set(outcomes) == {"old log, no archive", "old log, whole archive", "removed, whole archive"}, outcomes


def count_operations(template: Path, archives: Path) -> int:
    """How many I/O operations a compaction of `template` takes (a run without a cut)."""
    folder = template.parent.parent / "count"
    shutil.copytree(template.parent, folder)
    with Power(random.Random()) as power, EventLog(folder / template.name, connect=power.connect) as log_:
        compact(log_, Retention.archive, archives, files=power.files())
        operations = power.operations
    shutil.rmtree(folder)
    shutil.rmtree(archives)
    return operations


def after_cut(path: Path, archives: Path, snapshot_seq: int) -> str:
    """What a cut left: the log intact and either untouched or cut at `snapshot_seq`
    with its whole archive; any archive under its name is whole."""
    with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    with EventLog(path, readonly=True) as log_:
        assert verify(log_).fault is None
        base = log_.base()
    name = archives / f"events-{1:09d}-{snapshot_seq:09d}.jsonl.gz"
    whole = False
    if name.exists():
        verdict = archive.verify(name)
        assert verdict.fault is None, f"a damaged archive under its name: {verdict.fault}"
        assert (verdict.first_seq, verdict.last_seq) == (1, snapshot_seq), "an archive short of events"
        whole = True
    if base.seq == 0:
        return "old log, whole archive" if whole else "old log, no archive"
    assert base.seq == snapshot_seq
    assert whole, "events removed from the log without their whole archive"
    assert base.archive == str(name)
    return "removed, whole archive"
