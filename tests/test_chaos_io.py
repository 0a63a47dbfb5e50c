"""I/O faults at every write of a short run: nothing corrupted, no effect leaks, work resumes.

The fault is injected at the sqlite3 boundary (tests/support/io_faults.py): the agent's
log connection is a real SQLite connection whose write statements can be
refused, from the k-th on, with the errors SQLite gives for a full disk, an I/O
error or a lock held elsewhere, until the test heals the disk. A counting run
gives N, the number of writes of the whole run (the schema, start-up, the
workload, shutdown); then the same run is repeated with the disk failing at
write k, for every k in 1..N.

The run is deterministic so that "the k-th write" is the same statement every
time: the plant is the agent's simulated profile on gpiozero's MockFactory, but
the machine behind the pins is played in lock step (tests/support/lockstep.py): it
pulses an input only while the agent is idle, one at a time, so the commits
come in the same order in every run; the profile's timeouts (speed 1) are far
longer than the run, so no timer fires.

Beside the sweep: focused tests of what the sweep found, and the same faults met
by the MQTT gateway on a real Mosquitto, where the PUBACK an order may only get
once it is logged is read from the broker's own log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

import edge_agent.gateway as gateway_module
from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.devices.profile import load_profile
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.state import Stage, State
from edge_agent.errors import LogError
from edge_agent.gateway import Gateway
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Row
from edge_agent.log.verify import verify
from edge_agent.mqtt.inbound import order_command
from edge_agent.mqtt.topics import Topics
from edge_agent.storage import StorageGuard
from tests.support import PROFILE, WAIT_S
from tests.support.agents import running
from tests.support.brokers import Mosquitto, mosquitto
from tests.support.configs import agent_config
from tests.support.io_faults import Disk, faulty_disk
from tests.support.lockstep import Witness, machine_running, witnessing
from tests.support.orders import order, order_body
from tests.support.peer import Message, Peer, Predicate, on, peer

pytestmark = pytest.mark.chaos

DEVICE = "chaos-io"
# The agent checks a broken disk again every FAULT_RETRY_S (1 s); shortened so that the
# N runs fit in the time budget. What happens on each retry is unchanged.
RETRY_S = 0.01
RECOVER_S = 3.0  # after a fault: a run's whole workload takes ~0.1 s, so this is generous too
MAX_FAILURES = 5  # runs of the sweep that may fail before it stops: enough to see the pattern
ORDER_PAYLOADS = (  # as they come from MQTT: four orders (one waits, the cell has 3 stations)...
    {"order_id": "o1", "product_id": "widget-a", "qty": 2, "warehouse": "WH1"},
    {"order_id": "o2", "product_id": "gadget-b", "qty": 1, "warehouse": "WH1"},
    {"order_id": "o3", "product_id": "widget-a", "qty": 1, "warehouse": "WH2", "priority": 1},
    {"order_id": "o4", "product_id": "gadget-b", "qty": 1, "warehouse": "WH2"},
    {"order_id": "bad-1", "product_id": "widget-a", "qty": "2", "warehouse": "WH1"},  # ...one rejected...
    {"order_id": "o1", "product_id": "widget-a", "qty": 2, "warehouse": "WH1"},  # ...one redelivered
)
GOOD = ("o1", "o2", "o3", "o4")
BAD = ("bad-1",)


def make_config(data_dir: Path) -> Config:
    # Speed 1: timeouts of 10 s and more, none fires during a run of a fraction of a second.
    # Not connected: the outbox's broker is played by `Witness`. A snapshot every 10 events,
    # the fewest allowed: snapshot writes are among the k.
    return agent_config(data_dir, device_id=DEVICE, speed=1, log={"snapshot_every": 10})


def quick_retries(config: Config) -> StorageGuard:
    """The disk tried again every RETRY_S, not every second."""
    return StorageGuard(config.data_dir, config.limits.min_free_mb, retry_s=RETRY_S)


def offered_orders() -> list[cmd.SubmitOrder | cmd.RejectOrder]:
    products = dict(load_profile(PROFILE).max_qty().items())
    return [order_command(orjson.dumps(payload), products, 65536) for payload in ORDER_PAYLOADS]


@dataclass
class Run:
    """What one run with a failing disk showed."""

    fail_at: int | None
    writes: int = 0
    refused: int = 0
    failed_statement: str | None = None
    phase: str = "none"  # where the fault hit: "start-up", "running", "shutdown" or "none"
    witnesses: list[Witness] = field(default_factory=list)


def done(witness: Witness) -> bool:
    """Every good order shipped and tidied up, every offer acknowledged."""
    state = witness.agent.state
    return state.accepted >= len(GOOD) and not state.work_items and len(witness.acked) == witness.offers


async def first_life(config: Config, disk: Disk, run: Run) -> None:
    """The run on the failing disk: fault, checks while it lasts, heal, resume."""
    orders = offered_orders()
    with faulty_disk(disk, config.events_db):
        try:
            async with Agent(config, storage=quick_retries(config)) as agent:
                with witnessing(agent, disk) as witness:
                    run.witnesses.append(witness)
                    for order in orders:
                        witness.offer(order)
                    async with running(agent) as witness.task, machine_running(agent, witness.changes):
                        await witness.until(lambda: done(witness) or disk.broken, "the workload or a fault")
                        if disk.broken:
                            run.phase = "running"
                            await while_broken(witness, disk, config)
                            disk.heal()
                            # The broker sends unacknowledged orders again (after a reconnect).
                            acked = witness.acked_ids()
                            for order in orders:
                                if not acked[order.order_id or ""]:
                                    witness.offer(order)
                            await witness.until(
                                lambda: agent.fault is None, "resuming once the disk works again", RECOVER_S
                            )
                        await witness.until(lambda: done(witness), "every order finished after the fault", RECOVER_S)
        except LogError:
            if run.phase != "none":
                raise
            run.phase = "start-up" if not run.witnesses else "shutdown"
        finally:
            run.writes, run.refused, run.failed_statement = disk.writes, disk.refused, disk.first_refused


async def while_broken(witness: Witness, disk: Disk, config: Config) -> None:
    """What must hold while the log cannot be written."""
    agent = witness.agent
    await witness.until(lambda: agent.fault is not None, "the storage-fault mode")
    acked_before = len(witness.acked)
    refused = disk.refused
    # The agent tries again (each try is a refused write); nothing may have moved meanwhile.
    await witness.until(
        lambda: disk.refused >= refused + 2,
        f"two more tries of the broken disk (one every {RETRY_S:g} s)",
        timeout=100 * RETRY_S,
    )
    assert agent.fault is not None
    on = [name for name in agent.devices.outputs if agent.devices.is_on(name)]
    assert on == [], f"outputs on in the storage-fault mode: {on}"
    assert len(witness.acked) == acked_before
    # Never a half-written state: a reader sees an intact log while the fault lasts.
    with EventLog(config.events_db, readonly=True) as reader:
        verdict = verify(reader)
    assert verdict.fault is None, f"the log is damaged while the disk is broken: {verdict.fault}"


async def second_life(config: Config, run: Run) -> None:
    """A restart on the healed disk; every order is offered again (the broker redelivering
    the unacknowledged, a sender retrying the rest): each finishes exactly once."""
    orders = offered_orders()
    async with Agent(config, storage=quick_retries(config)) as agent:
        witness = Witness(agent, None)
        run.witnesses.append(witness)
        try:
            for order in orders:
                witness.offer(order)
            async with running(agent) as witness.task, machine_running(agent, witness.changes):
                await witness.until(lambda: done(witness), "every order finished after a restart")
        finally:
            witness.close()


def check_log(config: Config, run: Run) -> None:
    """The file afterwards: intact, each order accepted and shipped exactly once, and
    everything that was acknowledged or published is what the log holds."""
    with sqlite3.connect(f"{config.events_db.resolve().as_uri()}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with EventLog(config.events_db, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None, f"the log is damaged: {verdict.fault}"
        rows = {row.seq: row for row in log_.rows()}
    kinds = Counter((row.type, row.subject) for row in rows.values())
    for order_id in GOOD:
        assert kinds["OrderAccepted", order_id] == 1, f"{order_id} accepted {kinds['OrderAccepted', order_id]} times"
        assert kinds["InventoryIssued", order_id] == 1, f"{order_id} shipped {kinds['InventoryIssued', order_id]} times"
    for order_id in BAD:
        assert kinds["OrderAccepted", order_id] == 0
        assert kinds["OrderRejected", order_id] >= 1
    inventory = [orjson.loads(row.data)["inventory_id"] for row in rows.values() if row.type == "InventoryIssued"]
    assert inventory == [f"INV{n:05d}" for n in range(1, len(GOOD) + 1)]
    for witness in run.witnesses:
        assert witness.violations == []
        for order_id, records in witness.acked:
            for record in records:
                assert _same(rows.get(record.seq), record.ts, type(record.event).__name__, record.event.subject), (
                    f"order {order_id} acknowledged on event {record.seq}, which the log does not hold"
                )
        for message in witness.published:
            seq = int(str(message["seq"]))
            assert _same(rows.get(seq), message["ts"], message["type"], message["subject"]), (
                f"event {seq} published but not in the log"
            )
            assert message["data"] == orjson.loads(rows[seq].data)


def _same(row: Row | None, ts: object, type_: object, subject: object) -> bool:
    return row is not None and (row.ts, row.type, row.subject) == (ts, type_, subject)


def run_with_fault_at(data_dir: Path, fail_at: int | None, run: Run | None = None) -> Run:
    """The whole run with the disk failing from write `fail_at` on (None: never); what it
    showed is kept in `run` as it goes, so that a failure can say where the fault hit."""
    config = make_config(data_dir)
    run = run or Run(fail_at)
    disk = Disk(fail_at)

    async def both_lives() -> None:
        await first_life(config, disk, run)
        await second_life(config, run)

    asyncio.run(both_lives())
    check_log(config, run)
    return run


@contextmanager
def quiet_logs() -> Iterator[None]:
    """The agent logs every fault; over N runs that is noise, not information."""
    logger = logging.getLogger("edge_agent")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@pytest.mark.slow
def test_a_disk_failing_at_any_write_corrupts_nothing_leaks_no_effect_and_work_resumes(tmp_path: Path) -> None:
    """For every k in 1..N: the disk fails from the k-th write of the run until healed.
    A fault at start-up stops the start (LogError); one at shutdown fails the shutdown
    (LogError, outputs already off); one while running puts the agent in its storage-fault
    mode: outputs off, no order acknowledged, nothing published, the log intact to readers,
    and the disk tried again and again. Once healed the agent resumes by itself. In every
    case the file verifies afterwards, nothing acknowledged or published is missing from
    it, and after a restart every order has been accepted once and shipped once. The
    sweep stops after MAX_FAILURES failed runs and lists them, with the statement each
    fault hit."""
    with quiet_logs():
        counted = run_with_fault_at(tmp_path / "count", None)
        n = counted.writes
        assert counted.refused == 0
        failures: list[str] = []
        phases: Counter[str] = Counter()
        for k in range(1, n + 2):
            run = Run(k)
            try:
                run_with_fault_at(tmp_path / f"k{k}", k, run)
            except Exception as error:
                failures.append(f"k={k} ({run.phase}, {run.failed_statement}): {type(error).__name__}: {error}")
                if len(failures) == MAX_FAILURES:
                    failures.append(f"(stopped at k={k} of {n})")
                    break
                continue
            phases[run.phase] += 1
            if k <= n and run.refused == 0:
                failures.append(f"k={k}: write {k} of {n} was never reached: the run is not deterministic")
            if k == n + 1 and run.refused:
                failures.append(f"k={k}: the run made more than the {n} writes counted: it is not deterministic")
    assert failures == [], f"{len(failures)} runs failed (N = {n}):\n" + "\n".join(failures)
    assert set(phases) >= {"start-up", "running", "shutdown"}, phases  # the faults met every phase


def one_order_done(agent: Agent) -> bool:
    return agent.state.inventory_seq == 1 and not agent.state.work_items


def test_a_broken_disk_is_tried_again_and_work_resumes_even_with_no_order_waiting(tmp_path: Path) -> None:
    """The storage-fault mode keeps trying the disk every FAULT_RETRY_S and resumes by
    itself once it works, also when nothing else is going on (no order waiting, outputs off
    so no input comes)."""
    config = make_config(tmp_path)
    disk = Disk()

    async def scenario() -> Witness:
        with faulty_disk(disk, config.events_db):
            async with Agent(config, storage=quick_retries(config)) as agent:
                with witnessing(agent, disk) as witness:
                    witness.offer(offered_orders()[0])
                    async with running(agent) as witness.task:
                        await witness.until(lambda: agent.devices.is_on("s1.run"), "o1 building on s1")
                        disk.break_now()
                        async with machine_running(agent, witness.changes):  # its first unit cannot be logged
                            await witness.until(lambda: agent.fault is not None, "the storage-fault mode")
                            tried = disk.refused
                            await witness.until(
                                lambda: disk.refused >= tried + 3, "three more tries of the disk", 100 * RETRY_S
                            )
                            disk.heal()
                            await witness.until(lambda: agent.fault is None, "resuming by itself", 100 * RETRY_S)
                            await witness.until(lambda: one_order_done(agent), "o1 shipped", RECOVER_S)
        return witness

    witness = asyncio.run(scenario())
    assert witness.violations == []


def test_a_workflow_step_whose_commit_failed_is_taken_up_again_once_the_disk_works(tmp_path: Path) -> None:
    """A commit of the workflow's own progress (a step completed) meets a broken disk; once
    the disk works again the item moves on and ships. (The workflow looks only at items
    that events touched: it must not forget them when the commit of its moves fails, or
    the item would stay InventoryAvailable, never tidied up, until a restart.)"""
    config = make_config(tmp_path)
    disk = Disk()

    async def scenario() -> Witness:
        with faulty_disk(disk, config.events_db):
            async with Agent(config) as agent:
                with witnessing(agent, disk) as witness:

                    def break_after_arrival(state: State) -> None:
                        item = state.work_items.get("o2")
                        if item is not None and item.stage is Stage.INVENTORY_AVAILABLE and disk.fail_at is None:
                            disk.break_now()  # the next write: the workflow completing the item's step

                    agent.add_observer(lambda commit: break_after_arrival(commit.state))
                    witness.offer(offered_orders()[1])
                    async with running(agent) as witness.task, machine_running(agent, witness.changes):
                        await witness.until(lambda: agent.fault is not None, "the storage-fault mode")
                        assert disk.first_refused == "BEGIN IMMEDIATE"
                        disk.heal()  # before the agent's first retry (FAULT_RETRY_S, 1 s): it succeeds
                        await witness.until(lambda: agent.fault is None, "resuming by itself")
                        await witness.until(lambda: one_order_done(agent), "o2 tidied up", RECOVER_S)
        return witness

    witness = asyncio.run(scenario())
    assert witness.violations == []


def hands_off(agent: Agent) -> None:
    """The simulated machine makes no input of its own (every station jammed, every batch
    lost): the test's pulses are the only ones, as a real sensor fires once, so an edge the
    agent loses stays lost."""
    assert agent.simulator is not None
    agent.simulator.jammed.update(station.id for station in agent.profile.stations)
    agent.simulator.batches_to_lose = 1_000_000


def building_on(agent: Agent, order_id: str) -> str | None:
    """The station building `order_id`, once its run output is on."""
    item = agent.state.work_items.get(order_id)
    station = item.station if item is not None else None
    return station if station is not None and agent.devices.is_on(f"{station}.run") else None


def outputs_on(agent: Agent) -> list[str]:
    return [name for name in agent.devices.outputs if agent.devices.is_on(name)]


def logged(config: Config) -> Counter[tuple[str, str]]:
    """The log file, verified: how many events of each (type, subject) it holds."""
    with EventLog(config.events_db, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None, f"the log is damaged: {verdict.fault}"
        return Counter((row.type, row.subject) for row in log_.rows())


def outcome(task: asyncio.Task[Any]) -> str:
    """How a finished task ended (its error retrieved, so that asyncio does not warn of it)."""
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return f"raised {error!r}" if error is not None else f"returned {task.result()!r}"


def refused_events(disk: Disk) -> list[tuple[str, str]]:
    """(type, subject) of the event rows the disk refused to write."""
    return [(row[2], row[3]) for row in disk.refused_rows]  # (seq, ts, type, subject, data, hash)


@pytest.mark.parametrize("sensor", ["unit_done", "arrived"])
def test_a_sensor_edge_whose_commit_fails_is_recorded_once_the_disk_works(tmp_path: Path, sensor: str) -> None:
    """A real sensor fires once: a station's unit-done input as the unit leaves it, the
    lane's arrival input as the batch reaches the warehouse. When the disk breaks just as
    the edge comes, its commit fails and the agent goes into its storage-fault mode (outputs
    off, nothing logged); the edge must outlive the fault, or the order waits for a pulse
    that never comes, until a timeout fails a unit that was built or a batch that arrived.
    Once the disk works, the edge is decided and committed: its events once, and the order
    finishes once."""
    config = make_config(tmp_path)
    disk = Disk()
    order_id = "o2"  # one gadget-b

    async def scenario() -> Witness:
        with faulty_disk(disk, config.events_db):
            async with Agent(config, storage=quick_retries(config)) as agent:
                with witnessing(agent, disk) as witness:
                    hands_off(agent)
                    witness.offer(offered_orders()[1])
                    async with running(agent) as witness.task:
                        await witness.until(lambda: building_on(agent, order_id) is not None, f"{order_id} building")
                        station = building_on(agent, order_id)
                        if sensor == "arrived":
                            agent.devices.pulse_input(f"{station}.unit_done")
                            await witness.until(lambda: agent.devices.is_on("lane.conveyor"), f"{order_id} on the lane")
                            pin, edge_events = "lane.arrived", ["ShipmentArrived", "InventoryIssued"]
                        else:
                            pin, edge_events = f"{station}.unit_done", ["UnitBuilt", "BuildComplete"]
                        before = agent.state.last_seq
                        disk.break_after_lock()  # the agent is idle: the next commit is the edge's
                        agent.devices.pulse_input(pin)
                        await witness.until(lambda: agent.fault is not None, "the storage-fault mode")
                        assert refused_events(disk) == [(kind, order_id) for kind in edge_events], (
                            "the fault did not hit the edge's own commit"
                        )
                        tried = disk.refused
                        await witness.until(
                            lambda: disk.refused >= tried + 2, "two more tries of the disk", 100 * RETRY_S
                        )
                        assert agent.fault is not None
                        assert outputs_on(agent) == [], "outputs on in the storage-fault mode"
                        assert agent.state.last_seq == before, "something was committed on a broken disk"
                        assert not any(logged(config)[kind, order_id] for kind in edge_events)

                        disk.heal()
                        if sensor == "unit_done":
                            await witness.until(
                                lambda: agent.devices.is_on("lane.conveyor"),
                                "the unit recorded once the disk works, and the batch on the lane",
                                RECOVER_S,
                            )
                            agent.devices.pulse_input("lane.arrived")
                        await witness.until(lambda: one_order_done(agent), f"{order_id} shipped", RECOVER_S)
        return witness

    witness = asyncio.run(scenario())
    assert witness.violations == []
    kinds = logged(config)
    for kind in ("UnitBuilt", "BuildComplete", "ShipmentArrived", "InventoryIssued", "TidiedUp"):
        assert kinds[kind, order_id] == 1, f"{kind} logged {kinds[kind, order_id]} times for {order_id}"


@pytest.mark.parametrize("caller", ["waits", "gives-up"])
def test_a_cancel_whose_commit_fails_is_answered_once_the_disk_works(tmp_path: Path, caller: str) -> None:
    """`await agent.cancel(order_id)` (in-process, or the gateway's cancel command) whose
    commit meets a broken disk: the agent goes into its storage-fault mode and the cancel
    waits. It must neither fail (its caller would take the disk's error for the answer and
    have to try again by itself) nor be lost (it would never be answered); once the disk
    works it is decided and committed, answered with its OrderCancelled, and the order is
    tidied up. A caller that gives up waiting meanwhile has the cancel dropped, and the
    agent carries on: the same cancel asked again is answered."""
    config = make_config(tmp_path)
    disk = Disk()

    async def scenario() -> tuple[Witness, str]:
        with faulty_disk(disk, config.events_db):
            async with Agent(config, storage=quick_retries(config)) as agent:
                with witnessing(agent, disk) as witness:
                    hands_off(agent)
                    for order in offered_orders()[:4]:  # three stations: one order waits for one
                        witness.offer(order)
                    runs = [f"{station.id}.run" for station in agent.profile.stations]
                    async with running(agent) as witness.task:
                        await witness.until(
                            lambda: len(agent.state.work_items) == 4 and sum(map(agent.devices.is_on, runs)) == 3,
                            "three orders building, one waiting",
                        )
                        (waiting,) = (i.order_id for i in agent.state.work_items.values() if i.station is None)
                        before = agent.state.last_seq
                        disk.break_after_lock()  # the agent is idle: the next commit is the cancel's
                        cancelling = asyncio.create_task(agent.cancel(waiting), name="cancel")
                        cancelling.add_done_callback(lambda _: witness.changes.notify())
                        await witness.until(
                            lambda: agent.fault is not None or cancelling.done(), "the storage-fault mode"
                        )
                        assert not cancelling.done(), f"the cancel ended on a broken disk: it {outcome(cancelling)}"
                        assert refused_events(disk) == [("OrderCancelled", waiting)], (
                            "the fault did not hit the cancel's own commit"
                        )
                        tried = disk.refused
                        await witness.until(
                            lambda: disk.refused >= tried + 2, "two more tries of the disk", 100 * RETRY_S
                        )
                        assert not cancelling.done(), f"the cancel ended on a broken disk: it {outcome(cancelling)}"
                        assert agent.fault is not None
                        assert outputs_on(agent) == [], "outputs on in the storage-fault mode"
                        assert agent.state.last_seq == before, "something was committed on a broken disk"

                        if caller == "gives-up":
                            cancelling.cancel()
                            disk.heal()
                            await witness.until(lambda: agent.fault is None, "recovery", RECOVER_S)
                            assert waiting in agent.state.work_items, "a cancel nobody waits for was committed"
                            cancelling = asyncio.create_task(agent.cancel(waiting), name="cancel again")
                        disk.heal()
                        async with asyncio.timeout(RECOVER_S):
                            records = await cancelling
                        assert [record.event for record in records] == [ev.OrderCancelled(waiting)]
                        assert all(record.seq <= agent.state.last_seq for record in records)
                        await witness.until(
                            lambda: waiting not in agent.state.work_items, f"{waiting} tidied up", RECOVER_S
                        )
        return witness, waiting

    witness, waiting = asyncio.run(scenario())
    assert witness.violations == []
    kinds = logged(config)
    assert kinds["OrderCancelled", waiting] == 1
    assert kinds["TidiedUp", waiting] == 1
    assert sum(n for (kind, _), n in kinds.items() if kind == "OrderCancelled") == 1


# -- over MQTT: the gateway on a real Mosquitto ---------------------------------------------


class BrokerLog:
    """Mosquitto's own account (`log_type all`) of what passed between it and the agent:
    the one place a PUBACK from the agent can be seen from outside."""

    def __init__(self, path: Path, client_id: str, topic: str) -> None:
        self._path = path
        self._sent = re.compile(
            rf"Sending PUBLISH to {re.escape(client_id)} \(d\d, q1, r\d, m(\d+), '{re.escape(topic)}'"
        )
        self._acked = re.compile(rf"Received PUBACK from {re.escape(client_id)} \(Mid: (\d+)")

    def _text(self) -> str:
        return self._path.read_text(encoding="utf-8", errors="replace")

    def sent(self) -> list[int]:
        """The message ids of the orders the broker sent the agent, in order."""
        return [int(mid) for mid in self._sent.findall(self._text())]

    def acked(self) -> set[int]:
        return {int(mid) for mid in self._acked.findall(self._text())}

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        """Another process writes the file: nothing to wait on but the file itself."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"not within {timeout:g} s in the broker's log: {what}") from None


@pytest.fixture
def chatty_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto that logs every packet, PUBACKs included."""
    with mosquitto(tmp_path / "mosquitto", "allow_anonymous true\nlog_type all") as broker:
        yield broker


@dataclass
class Cell:
    """The agent and its gateway on the broker, with the back office's peer and the witness."""

    agent: Agent
    gateway: Gateway
    gateway_task: asyncio.Task[None]
    witness: Witness
    peer: Peer
    topics: Topics
    config: Config

    async def publish(self, topic: str, payload: bytes | dict[str, object]) -> None:
        await asyncio.to_thread(self.peer.publish, topic, payload)

    async def received(self, predicate: Predicate, since: int = 0, timeout: float = WAIT_S) -> Message:
        """A message the peer got; the gateway failing meanwhile fails the wait (soon: the
        peer waits on a thread, in slices, so that no thread outlives a failed wait)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await asyncio.to_thread(self.peer.wait_for, predicate, since=since, timeout=0.2)
            except AssertionError:
                if self.gateway_task.done():
                    self.gateway_task.result()  # raises what stopped the gateway
                    raise AssertionError("the gateway stopped") from None
                if time.monotonic() > deadline:
                    raise


def mqtt_config(data_dir: Path, broker: Mosquitto, device_id: str, telemetry_s: float = 5.0) -> Config:
    mqtt = {"port": broker.port, "protocol": "5"}
    return agent_config(
        data_dir, device_id=device_id, speed=1, log={"snapshot_every": 10}, mqtt=mqtt, telemetry_interval_s=telemetry_s
    )


@asynccontextmanager
async def cell(config: Config, broker: Mosquitto, disk: Disk) -> AsyncIterator[Cell]:
    topics = Topics("factory", config.device_id)
    with (
        peer(broker.port, "5", f"factory/{config.device_id}/#", name="back-office") as back_office,
        faulty_disk(disk, config.events_db),
    ):
        async with Agent(config, storage=quick_retries(config)) as agent:
            gateway = Gateway(agent, config)
            # The gateway's outbox publishes for real.
            with witnessing(agent, disk, outbox=False) as witness:
                async with running(agent) as witness.task, machine_running(agent, witness.changes):
                    gateway_task = asyncio.create_task(gateway.run(), name="gateway")
                    try:
                        yield Cell(agent, gateway, gateway_task, witness, back_office, topics, config)
                    except BaseException:
                        disk.heal()  # so that stopping does not hide what went wrong
                        raise
                    finally:
                        await stop_gateway(gateway, gateway_task)


async def stop_gateway(gateway: Gateway, task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except BaseException:
        # It failed before its own stop: leave no paho thread reconnecting in this process.
        await asyncio.to_thread(gateway.link.stop)
        raise


def check_mqtt_log(config: Config, orders: Sequence[str], inventory: Sequence[Message]) -> None:
    """The file verifies, each order shipped once, each inventory record published for one order."""
    with EventLog(config.events_db, readonly=True) as log_:
        verdict = verify(log_)
        assert verdict.fault is None, verdict.fault
        shipped = Counter(row.subject for row in log_.rows(type_="InventoryIssued"))
    assert shipped == dict.fromkeys(orders, 1)
    records = {m.json()["inventory_id"]: m.json()["order_id"] for m in inventory}  # consumers dedupe by id
    assert sorted(records.values()) == sorted(orders)


def test_over_mqtt_an_order_met_by_a_broken_disk_is_acknowledged_only_once_it_is_logged(
    tmp_path: Path, chatty_mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An order arrives over MQTT while the log cannot be written: the broker gets no PUBACK
    for it (it keeps the order), no event goes out, the retained status says why; once the
    disk works, the PUBACK follows the order's commit and the order ships exactly once."""
    # The outbox cursor is saved every CURSOR_SAVE_S, a write of its own whose fault is the
    # test below; kept out of this fault's window so that this test sees the order's path.
    monkeypatch.setattr(gateway_module, "CURSOR_SAVE_S", 3600.0)
    device_id = f"chaos-{uuid.uuid4().hex[:8]}"
    config = mqtt_config(tmp_path / "var", chatty_mosquitto, device_id)
    broker_log = BrokerLog(chatty_mosquitto.folder / "mosquitto.log", device_id, f"factory/{device_id}/orders")
    disk = Disk()

    async def scenario() -> list[Message]:
        async with cell(config, chatty_mosquitto, disk) as c:
            await c.received(on(c.topics.status, state="online"))
            await c.publish(c.topics.device_orders, order_body(order("before")))
            await c.received(on(c.topics.inventory, order_id="before"))
            await broker_log.until(lambda: len(broker_log.sent()) == 1, "the first order sent to the agent")
            first_mid = broker_log.sent()[0]
            await broker_log.until(lambda: first_mid in broker_log.acked(), "the first order acknowledged")

            disk.break_now()
            mark = c.peer.mark()
            await c.publish(c.topics.device_orders, order_body(order("during")))
            await c.witness.until(lambda: c.agent.fault is not None, "the storage-fault mode")
            await broker_log.until(lambda: len(broker_log.sent()) == 2, "the order sent to the agent")
            mid = broker_log.sent()[1]
            tried = disk.refused
            await c.witness.until(lambda: disk.refused >= tried + 2, "two more tries of the disk", 100 * RETRY_S)
            status = await c.received(lambda m: m.topic == c.topics.status and "fault" in m.json(), since=mark)
            assert status.json()["state"] == "online"
            assert mid not in broker_log.acked(), "the order was acknowledged though it is not logged"
            committed = c.agent.state.last_seq
            late = [m.json()["seq"] for m in c.peer.messages(c.topics.events)[mark:] if m.json()["seq"] > committed]
            assert late == [], f"events published that are not committed: {late}"

            disk.heal()
            await c.received(on(c.topics.inventory, order_id="during"), since=mark)
            await broker_log.until(lambda: mid in broker_log.acked(), "the order acknowledged once logged")
            assert c.witness.violations == []
            return c.peer.messages(c.topics.inventory)

    inventory = asyncio.run(scenario())
    check_mqtt_log(config, ["before", "during"], inventory)


def test_over_mqtt_a_broken_disk_does_not_stop_the_gateway(tmp_path: Path, chatty_mosquitto: Mosquitto) -> None:
    """The gateway saves the outbox cursor every CURSOR_SAVE_S: while the disk is broken
    that write fails too, and the gateway must go on (telemetry, the status saying why, the
    orders waiting unacknowledged) and deliver the work once the disk is back."""
    device_id = f"chaos-{uuid.uuid4().hex[:8]}"
    config = mqtt_config(tmp_path / "var", chatty_mosquitto, device_id, telemetry_s=0.2)
    disk = Disk()

    async def scenario() -> list[Message]:
        async with cell(config, chatty_mosquitto, disk) as c:
            await c.received(on(c.topics.status, state="online"))
            await c.publish(c.topics.device_orders, order_body(order("before")))
            await c.received(on(c.topics.inventory, order_id="before"))
            with EventLog(config.events_db, readonly=True) as reader:
                # Events published and acknowledged but not yet saved as such: the next
                # cursor save has something to write. (Another rejection if it just did.)
                for attempt in range(5):
                    mark = c.peer.mark()
                    await c.publish(c.topics.device_orders, {"order_id": f"bad-{attempt}"})
                    await c.received(on(c.topics.rejected, order_id=f"bad-{attempt}"), since=mark)
                    await c.received(on(c.topics.telemetry, outbox_lag=0), since=mark)  # all acknowledged
                    if (reader.cursor(OUTBOX_CURSOR) or 0) < c.gateway.outbox.acked:
                        disk.break_now()  # no await since the check: the save cannot slip in between
                        break
            assert disk.fail_at is not None
            mark = c.peer.mark()
            await c.publish(c.topics.device_orders, order_body(order("during")))
            await c.witness.until(lambda: c.agent.fault is not None, "the storage-fault mode")
            # Telemetry for more than two cursor-save periods: the gateway lives on.
            for _ in range(int(2 * gateway_module.CURSOR_SAVE_S / 0.2) + 2):
                mark = c.peer.mark()
                await c.received(on(c.topics.telemetry), since=mark)
            assert not c.gateway_task.done()
            disk.heal()
            await c.received(on(c.topics.inventory, order_id="during"))
            return c.peer.messages(c.topics.inventory)

    inventory = asyncio.run(scenario())
    check_mqtt_log(config, ["before", "during"], inventory)
