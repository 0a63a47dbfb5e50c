"""The whole agent on the simulated plant, in-process: what a plant engineer relies on.

Each test runs `Agent` with the `simulated` profile (gpiozero MockFactory pins and
the machine simulator) at a high `speed`, on a fresh data_dir, inside its own
`asyncio.run`. Nothing sleeps to wait for something: tests wait on the committed
state (`agent.wait_until`) under a timeout guard, and a quiet period (nothing may
happen) is a wait for any commit that must time out.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from edge_agent.agent import Agent
from edge_agent.cell import FAULT, station_input
from edge_agent.config import Config
from edge_agent.devices.gpio import Devices
from edge_agent.devices.simulator import Simulator
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.evolve import fold
from edge_agent.domain.moments import later, seconds_between
from edge_agent.domain.state import Stage, State
from edge_agent.errors import CommandRejected
from edge_agent.log.journal import Journal, replay
from edge_agent.log.store import EventLog
from edge_agent.workflow.engine import WorkflowMismatch
from edge_agent.workflow.steps import STEP_NAMES
from tests.support import PROFILE
from tests.support.configs import agent_config
from tests.support.orders import order

# The simulated profile's figures, in simulated seconds (divided by `speed` at run time).
SECONDS_PER_UNIT = 1.0  # widget-a everywhere; gadget-b takes 1.5 on s1
TRANSIT_S = 3.0
UNIT_TIMEOUT_S = 10.0
TRANSIT_TIMEOUT_S = 15.0
RETRIES = 2

STATIONS = ("s1", "s2", "s3")
OUTPUTS = ("s1.run", "s2.run", "s3.run", "lane.conveyor", "status_led")
ESTOP = "estop"
GUARD_S = 20.0  # no wait in these tests should come anywhere near this

E = TypeVar("E")


# -- running a plant ---------------------------------------------------------------


def make_config(
    tmp_path: Path, speed: float, *, synchronous: Literal["full", "normal"] = "full", snapshot_every: int = 1000
) -> Config:
    log = {"synchronous": synchronous, "snapshot_every": snapshot_every}
    return agent_config(tmp_path / "data", device_id="cell-test", speed=speed, log=log)


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


@dataclass
class Plant:
    """A running agent: `agent.run()` as a task, and ways to wait on its committed state."""

    agent: Agent
    task: asyncio.Task[None]

    @property
    def state(self) -> State:
        return self.agent.state

    @property
    def simulator(self) -> Simulator:
        assert self.agent.simulator is not None
        return self.agent.simulator

    async def until(self, condition: Callable[[State], bool], timeout: float = GUARD_S) -> State:
        """The first committed state that satisfies `condition`; the current state when this returns."""
        try:
            async with asyncio.timeout(timeout):
                return await self.agent.wait_until(condition)
        except TimeoutError:
            if self.task.done():
                self.task.result()  # the agent's own failure says more than the timeout
            raise AssertionError(f"timed out after {timeout} s; stages now: {stages(self.state)}") from None

    async def commits_within(self, seconds: float) -> list[ev.Recorded]:
        """What gets committed within `seconds` (waits that long only if nothing is)."""
        seq = self.state.last_seq
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.agent.wait_until(lambda s: s.last_seq != seq)
        assert not self.task.done()
        return list(self.agent.journal.log.read(seq + 1))

    async def submit_all(self, orders: Iterable[cmd.SubmitOrder]) -> None:
        for submitted in orders:
            records = await self.agent.submit(submitted)
            assert [type(r.event) for r in records] == [ev.OrderAccepted]

    async def engage_estop(self) -> State:
        self.agent.devices.drive_input(ESTOP, True)
        return await self.until(lambda s: s.estop)

    def records(self) -> list[ev.Recorded]:
        return list(self.agent.journal.log.read())

    def pin(self, name: str) -> Any:
        return self.agent.devices.pin(name)


@asynccontextmanager
async def plant(config: Config) -> AsyncIterator[Plant]:
    """Start an agent and run it until the block ends; then stop it in order (as on SIGTERM)."""
    async with Agent(config) as agent:
        task = asyncio.create_task(agent.run(), name="agent")
        try:
            yield Plant(agent, task)
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


def stages(state: State) -> dict[str, Stage]:
    return {order_id: item.stage for order_id, item in state.work_items.items()}


def events_of(records: Iterable[ev.Recorded], kind: type[E]) -> list[E]:
    return [r.event for r in records if isinstance(r.event, kind)]


def history(records: Iterable[ev.Recorded], order_id: str) -> list[str]:
    """The types of the events about one order, in log order."""
    return [type(r.event).__name__ for r in records if r.event.subject == order_id]


def outputs_on(plant: Plant) -> dict[str, bool]:
    return {name: plant.agent.devices.is_on(name) for name in OUTPUTS}


def pin_states(plant: Plant, name: str, since: int = 0) -> list[bool]:
    return [bool(s.state) for s in plant.pin(name).states[since:]]


def assert_assigned_by_priority_then_age(records: list[ev.Recorded]) -> None:
    """Every StationAssigned takes the best item waiting at that moment: highest priority, then oldest."""
    accepted = {r.event.order_id: (r.seq, r.event.priority) for r in records if isinstance(r.event, ev.OrderAccepted)}
    waiting: set[str] = set()
    for record in records:
        match record.event:
            case ev.OrderQueued(order_id):
                waiting.add(order_id)
            case ev.StationAssigned(order_id, _):
                best = min(waiting, key=lambda o: (-accepted[o][1], accepted[o][0]))
                assert order_id == best, f"seq {record.seq}: {order_id} assigned while {best} waited"
                waiting.remove(order_id)
            case ev.OrderCancelled(order_id) | ev.OrderFailed(order_id, _):
                waiting.discard(order_id)


def assert_completed_once(records: list[ev.Recorded], order_ids: Iterable[str], qty: dict[str, int]) -> None:
    """Each order ran every workflow step exactly once, in order, and got exactly one inventory id;
    the inventory ids are INV00001.. with no gap and no repeat."""
    ids = list(order_ids)
    steps: dict[str, list[tuple[int, str]]] = {o: [] for o in ids}
    for step in events_of(records, ev.StepCompleted):
        steps[step.order_id].append((step.step, step.name))
    for order_id in ids:
        assert steps[order_id] == list(enumerate(STEP_NAMES)), order_id
        kinds = Counter(history(records, order_id))
        assert kinds["OrderAccepted"] == kinds["StationAssigned"] == kinds["BuildComplete"] == 1, (order_id, kinds)
        assert kinds["ShipmentStarted"] == kinds["ShipmentArrived"] == kinds["InventoryIssued"] == 1, (order_id, kinds)
        assert kinds["TidiedUp"] == 1, (order_id, kinds)
        assert kinds["UnitBuilt"] == qty[order_id], (order_id, kinds)
    issued = events_of(records, ev.InventoryIssued)
    assert sorted(i.order_id for i in issued) == sorted(ids)
    assert [i.inventory_id for i in issued] == [f"INV{n:05d}" for n in range(1, len(ids) + 1)]


# -- 1. many orders, priorities, inventory ids ---------------------------------------


def test_twenty_four_orders_are_built_by_priority_then_age_and_each_gets_the_next_inventory_id(
    tmp_path: Path,
) -> None:
    rng = random.Random(20260101)
    orders = [
        order(
            f"o{n:02d}",
            rng.randint(1, 3),
            priority=rng.choice([0, 0, 1, 2, 5]),
            product=rng.choice(["widget-a", "gadget-b"]),
        )
        for n in range(24)
    ]
    qty = {o.order_id: o.qty for o in orders}

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed=40)) as p:
            await p.engage_estop()
            await p.submit_all(orders)
            held = await p.until(lambda s: all(i.stage is Stage.FACTORY_READY for i in s.work_items.values()))
            assert len(held.work_items) == len(orders)
            assert all(station.order_id is None for station in held.stations)  # nothing starts under e-stop
            p.agent.devices.drive_input(ESTOP, False)
            done = await p.until(lambda s: not s.work_items)
            assert done.inventory_seq == len(orders)
            records = p.records()

        assigned = [e.order_id for e in events_of(records, ev.StationAssigned)]
        by_priority_then_age = [o.order_id for o in sorted(orders, key=lambda o: -o.priority)]  # stable: age
        assert assigned == by_priority_then_age
        assert_assigned_by_priority_then_age(records)
        assert_completed_once(records, qty, qty)
        assert not events_of(records, ev.OrderFailed)
        # One lane: batches ship one at a time, in completion order.
        completed = [e.order_id for e in events_of(records, ev.BuildComplete)]
        assert [e.order_id for e in events_of(records, ev.ShipmentStarted)] == completed
        assert [e.order_id for e in events_of(records, ev.InventoryIssued)] == completed
        for record in records:
            if isinstance(record.event, ev.ShipmentStarted):  # the lane was idle when it started
                before = [r for r in records if r.seq < record.seq]
                started = len(events_of(before, ev.ShipmentStarted))
                assert started == len(events_of(before, ev.ShipmentArrived))

    run(scenario)


# -- 2. replay equals the live state ---------------------------------------------------


def test_replaying_the_log_gives_exactly_the_live_state(tmp_path: Path) -> None:
    """A log with every kind of event (e-stop, a cancel, a failed build, a lost batch,
    snapshots): replay from the newest snapshot and a fold from nothing both give the
    agent's live state, while it runs and after it stopped."""
    config = make_config(tmp_path, speed=50, snapshot_every=10)
    orders = [order(f"r{n}", 1 + n % 3, priority=n % 2) for n in range(10)]

    def replayed() -> tuple[State, State]:
        with EventLog(config.events_db, readonly=True) as log:
            return replay(log), fold(State(), log.read())

    async def scenario() -> None:
        async with plant(config) as p:
            await p.engage_estop()
            await p.submit_all(orders)
            await p.until(lambda s: all(i.stage is Stage.FACTORY_READY for i in s.work_items.values()))
            await p.agent.cancel("r9")
            # Deterministic under e-stop: r1, r3, r5 (priority 1) go to s1, s2, s3 on release.
            p.simulator.jammed.add("s3")
            p.simulator.batches_to_lose = 1
            p.agent.devices.drive_input(ESTOP, False)
            await p.until(lambda s: "r5" not in s.work_items)  # failed on the jammed station
            p.simulator.jammed.clear()
            await p.until(lambda s: not s.work_items)
            live = p.state
            from_snapshot, from_scratch = replayed()  # no await since `live`: nothing committed in between
            assert from_snapshot == live
            assert from_scratch == live
            kinds = Counter(type(r.event).__name__ for r in p.records())
        assert kinds["OrderFailed"] == kinds["OrderCancelled"] == kinds["EstopReleased"] == 1
        assert kinds["RetryScheduled"] >= 3  # two for the jammed station, one for the lost batch
        with EventLog(config.events_db, readonly=True) as log:
            assert log.snapshot_seqs()
        stopped = p.state  # after AgentStopped
        from_snapshot, from_scratch = replayed()
        assert from_snapshot == stopped == from_scratch
        assert stopped.last_seq == live.last_seq + 1

    run(scenario)


# -- 3. e-stop in every stage --------------------------------------------------------


def test_estop_stops_every_stage_at_once_freezes_timers_and_resumes_where_it_was(tmp_path: Path) -> None:
    speed = 20.0
    # On release a (1 unit) and b (1 unit) finish first: one ships, the other queues for the
    # lane; c, d, e build for 6 units; f waits for a station.
    orders = [
        order("a", 1, priority=9),
        order("b", 1, priority=8),
        order("c", 6, priority=7),
        order("d", 6, priority=6),
        order("e", 6, priority=5),
        order("f", 1, priority=0),
    ]
    every_stage = {Stage.FACTORY_READY, Stage.FACTORY_ACCEPTED, Stage.FACTORY_COMPLETE, Stage.MOVE_TO_WAREHOUSE}

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            devices = p.agent.devices
            await p.engage_estop()
            assert not any(outputs_on(p).values())
            await p.submit_all(orders)
            await p.until(
                lambda s: len(s.work_items) == len(orders) and set(stages(s).values()) == {Stage.FACTORY_READY}
            )
            devices.drive_input(ESTOP, False)

            before = await p.until(lambda s: every_stage <= set(stages(s).values()))
            assert stages(before)["f"] is Stage.FACTORY_READY
            assert outputs_on(p) == dict.fromkeys(OUTPUTS, True)  # three stations, the conveyor, the LED
            units, batches = p.simulator.units_finished, p.simulator.batches_delivered

            devices.drive_input(ESTOP, True)
            assert outputs_on(p) == dict.fromkeys(OUTPUTS, False)  # at once, before the event is even logged

            engaged = await p.until(lambda s: s.estop)
            changes = {name: len(p.pin(name).states) for name in OUTPUTS}
            devices.pulse_input("s3.unit_done")  # a unit signal now builds nothing
            # Longer than the unit and the transit timeouts: the timers are frozen, nothing moves.
            assert await p.commits_within(1.2 * max(UNIT_TIMEOUT_S, TRANSIT_TIMEOUT_S) / speed) == []
            assert p.state == engaged
            assert (p.simulator.units_finished, p.simulator.batches_delivered) == (units, batches)
            assert {name: len(p.pin(name).states) for name in OUTPUTS} == changes

            devices.drive_input(ESTOP, False)
            assert not any(outputs_on(p).values())  # nothing comes on before its event is logged
            await p.until(lambda s: not s.work_items)
            records = p.records()

        assert_completed_once(records, [o.order_id for o in orders], {o.order_id: o.qty for o in orders})
        assert not events_of(records, ev.RetryScheduled)
        assert not events_of(records, ev.OrderFailed)
        (engage,) = [r for r in records if isinstance(r.event, ev.EstopEngaged) and r.seq > before.last_seq]
        (release,) = [r for r in records if isinstance(r.event, ev.EstopReleased) and r.seq > engage.seq]
        assert release.seq == engage.seq + 1  # nothing in between
        assert engage.seq == engaged.last_seq
        # Every running timer was moved on by exactly the time the e-stop was engaged.
        frozen_s = seconds_between(engage.ts, release.ts)
        with EventLog(p.agent.config.events_db, readonly=True) as log:
            resumed = replay(log, release.seq)
        timed = [i for i in engaged.work_items.values() if i.deadline is not None]
        assert {i.order_id for i in timed} >= {"c", "d", "e"}
        for item in timed:
            assert resumed.work_items[item.order_id].deadline == later(item.deadline or "", frozen_s)
            assert resumed.work_items[item.order_id].units_done == item.units_done

    run(scenario)


def test_an_arrival_signal_while_the_estop_is_engaged_delivers_nothing(tmp_path: Path) -> None:
    """A hand through the lane's light barrier during e-stop maintenance must not issue the
    inventory record of a batch standing still on the belt."""
    speed = 20.0

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            await p.submit_all([order("m", 1)])
            moving = await p.until(lambda s: s.lane.order_id == "m")
            engaged = await p.engage_estop()
            assert engaged.work_items["m"] == moving.work_items["m"]
            p.agent.devices.pulse_input("lane.arrived")
            assert await p.commits_within(0.3) == []
            assert p.state.work_items["m"].stage is Stage.MOVE_TO_WAREHOUSE
            p.agent.devices.drive_input(ESTOP, False)
            await p.until(lambda s: not s.work_items)
            assert_completed_once(p.records(), ["m"], {"m": 1})

    run(scenario)


# -- 4. unit timeout -------------------------------------------------------------------


def test_a_jammed_station_retries_then_fails_the_order_with_the_reason_and_frees_the_station(tmp_path: Path) -> None:
    speed = 50.0
    reason = f"no unit from station s1 within {UNIT_TIMEOUT_S / speed:g} s"

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            p.simulator.jammed.add("s1")
            await p.submit_all([order("j1", 2)])
            await p.until(lambda s: "j1" not in s.work_items)
            records = p.records()
            assert p.state.stations[0].order_id is None
            assert not p.agent.devices.is_on("s1.run")
            # On while building, off during each backoff, off for good on failure.
            assert pin_states(p, "s1.run") == [False, True, False, True, False, True, False]

            p.simulator.jammed.clear()  # repaired: the freed station takes the next order
            await p.submit_all([order("j2", 1)])
            await p.until(lambda s: "j2" not in s.work_items)
            assert events_of(p.records(), ev.StationAssigned)[-1] == ev.StationAssigned("j2", "s1")

        retries = events_of(records, ev.RetryScheduled)
        assert [(r.order_id, r.attempt, r.reason) for r in retries] == [("j1", n, reason) for n in (1, 2)]
        assert events_of(records, ev.OrderFailed) == [
            ev.OrderFailed("j1", f"{reason} (gave up after {RETRIES} retries)")
        ]
        assert history(records, "j1")[-2:] == ["OrderFailed", "TidiedUp"]
        assert not events_of(records, ev.UnitBuilt)
        assert not events_of(records, ev.InventoryIssued)

    run(scenario)


def test_a_station_unjammed_after_the_first_retry_completes_the_order(tmp_path: Path) -> None:
    speed = 50.0

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            p.simulator.jammed.add("s1")
            await p.submit_all([order("k1", 2)])
            await p.until(lambda s: s.work_items["k1"].attempt == 1)
            p.simulator.jammed.discard("s1")
            await p.until(lambda s: "k1" not in s.work_items)
            records = p.records()

        retries = events_of(records, ev.RetryScheduled)
        assert [(r.attempt, r.reason) for r in retries] == [(1, f"no unit from station s1 within {10 / speed:g} s")]
        assert not events_of(records, ev.OrderFailed)
        assert_completed_once(records, ["k1"], {"k1": 2})

    run(scenario)


# -- 5. transit timeout ----------------------------------------------------------------


def test_a_lost_batch_is_sent_again_and_arrives(tmp_path: Path) -> None:
    speed = 50.0

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            p.simulator.batches_to_lose = 1
            await p.submit_all([order("t1", 1)])
            await p.until(lambda s: "t1" not in s.work_items)
            records = p.records()
            # Runs, stops for the backoff, runs again until the batch arrives.
            assert pin_states(p, "lane.conveyor") == [False, True, False, True, False]

        retries = events_of(records, ev.RetryScheduled)
        assert [(r.attempt, r.reason) for r in retries] == [
            (1, f"batch did not arrive within {TRANSIT_TIMEOUT_S / speed:g} s")
        ]
        assert not events_of(records, ev.OrderFailed)
        assert_completed_once(records, ["t1"], {"t1": 1})

    run(scenario)


def test_a_batch_lost_more_often_than_the_retries_fails_and_frees_the_lane_for_the_next(tmp_path: Path) -> None:
    """When u1 fails, the conveyor goes off and, in the same turn of the control loop, on again
    for u2: u2 must arrive after its own transit, with no spurious retry."""
    speed = 50.0
    reason = f"batch did not arrive within {TRANSIT_TIMEOUT_S / speed:g} s"

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            p.simulator.batches_to_lose = RETRIES + 1
            await p.submit_all([order("u1", 1), order("u2", 2)])  # u2 completes while u1 is on the lane
            await p.until(lambda s: not s.work_items)
            records = p.records()
            assert p.state.lane.order_id is None
            assert not p.agent.devices.is_on("lane.conveyor")

        retries = [(r.order_id, r.attempt, r.reason) for r in events_of(records, ev.RetryScheduled)]
        assert retries[:2] == [("u1", 1, reason), ("u1", 2, reason)]
        assert events_of(records, ev.OrderFailed) == [
            ev.OrderFailed("u1", f"{reason} (gave up after {RETRIES} retries)")
        ]
        assert history(records, "u1")[-2:] == ["OrderFailed", "TidiedUp"]
        assert [e.order_id for e in events_of(records, ev.ShipmentStarted)] == ["u1", "u2"]
        failed_at = next(r.seq for r in records if isinstance(r.event, ev.OrderFailed))
        u2_ships = next(r.seq for r in records if r.event == ev.ShipmentStarted("u2"))
        assert u2_ships > failed_at  # u2 waited for the lane, then had it
        assert [(e.order_id, e.inventory_id) for e in events_of(records, ev.InventoryIssued)] == [("u2", "INV00001")]
        assert retries == [("u1", 1, reason), ("u1", 2, reason)]  # u2's batch arrives on its first run

    run(scenario)


# -- 6. cancel -------------------------------------------------------------------------


def test_cancelling_a_waiting_or_building_order_frees_its_station_for_the_next(tmp_path: Path) -> None:
    """New is not observable through the agent: validation runs in the same turn of
    the control loop as acceptance, before any other request is read. Waiting
    (FactoryReady) and building (FactoryAccepted) are."""
    speed = 20.0
    long_build = [order(f"b{n}", 40, priority=5) for n in (1, 2, 3)]  # 2 s each at this speed
    waiting = [order("w1", 1, priority=1), order("w2", 1)]

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            await p.engage_estop()
            await p.submit_all([*long_build, *waiting])
            await p.until(lambda s: len(s.work_items) == 5)
            p.agent.devices.drive_input(ESTOP, False)
            await p.until(lambda s: [st.order_id for st in s.stations] == ["b1", "b2", "b3"])

            # Waiting: cancelled, tidied up, never built.
            cancelled = await p.agent.cancel("w2")
            assert [r.event for r in cancelled] == [ev.OrderCancelled("w2")]
            await p.until(lambda s: "w2" not in s.work_items)

            # Building with an order waiting: the run output goes off, the station takes w1.
            seen = len(p.pin("s2.run").states)
            await p.agent.cancel("b2")
            after = await p.until(lambda s: "b2" not in s.work_items and s.work_items["w1"].station == "s2")
            assert pin_states(p, "s2.run", seen) == [False, True]
            assert after.work_items["w1"].stage is Stage.FACTORY_ACCEPTED

            # Building with nothing waiting: the station stops and stays free.
            await p.agent.cancel("b3")
            idle = await p.until(lambda s: "b3" not in s.work_items)
            assert idle.stations[2].order_id is None
            assert not p.agent.devices.is_on("s3.run")
            await p.agent.cancel("b1")
            await p.until(lambda s: not s.work_items)
            assert not any(p.agent.devices.is_on(f"{s}.run") for s in STATIONS)
            records = p.records()

        assert history(records, "w2") == ["OrderAccepted", "OrderQueued", "StepCompleted", "OrderCancelled", "TidiedUp"]
        for order_id in ("b1", "b2", "b3"):
            assert history(records, order_id)[-2:] == ["OrderCancelled", "TidiedUp"]
            assert "BuildComplete" not in history(records, order_id)
        cancel_b2 = next(r.seq for r in records if r.event == ev.OrderCancelled("b2"))
        w1_assigned = next(r for r in records if isinstance(r.event, ev.StationAssigned) and r.event.order_id == "w1")
        assert w1_assigned.event == ev.StationAssigned("w1", "s2")
        assert w1_assigned.seq > cancel_b2
        assert [(e.order_id, e.inventory_id) for e in events_of(records, ev.InventoryIssued)] == [("w1", "INV00001")]

    run(scenario)


def test_an_order_already_built_cannot_be_cancelled_and_nothing_changes(tmp_path: Path) -> None:
    speed = 20.0

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed)) as p:
            p.simulator.batches_to_lose = 1  # x holds the lane until its transit timeout
            await p.submit_all([order("x", 1), order("y", 2)])
            before = await p.until(lambda s: s.work_items["y"].stage is Stage.FACTORY_COMPLETE)
            assert before.lane.order_id == "x"
            with pytest.raises(CommandRejected, match="FactoryComplete"):
                await p.agent.cancel("y")
            with pytest.raises(CommandRejected, match="MoveToWarehouse"):
                await p.agent.cancel("x")
            with pytest.raises(CommandRejected, match="not a live work item"):
                await p.agent.cancel("nobody")
            assert p.state.work_items["y"] == before.work_items["y"]
            assert p.state.lane == before.lane
            await p.until(lambda s: not s.work_items)
            with pytest.raises(CommandRejected, match="not a live work item"):
                await p.agent.cancel("y")  # tidied up
            records = p.records()

        assert not events_of(records, ev.OrderCancelled)
        assert_completed_once(records, ["x", "y"], {"x": 1, "y": 2})

    run(scenario)


# -- 7. output timing ------------------------------------------------------------------


def test_a_station_and_the_conveyor_switch_for_exactly_as_long_as_the_work_takes(tmp_path: Path) -> None:
    """gpiozero's assert_states_and_times allows max(50 ms, 5 %) per step and does not
    compare lengths. At speed 1 the two units take 2 s (±100 ms) and the transit 3 s
    (±150 ms): robust on a loaded machine. The log is not fsynced here: disk latency
    is not what this test measures."""
    speed = 1.0

    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed, synchronous="normal")) as p:
            run_pin, conveyor = p.pin("s1.run"), p.pin("lane.conveyor")
            # Off since the agent created them; nothing came on at start-up.
            assert pin_states(p, "s1.run") == [False]
            assert pin_states(p, "lane.conveyor") == [False]
            run_pin.clear_states()
            conveyor.clear_states()
            await p.submit_all([order("q2", 2)])
            await p.until(lambda s: "q2" not in s.work_items)

            build_s = 2 * SECONDS_PER_UNIT / speed
            assert len(run_pin.states) == 3
            run_pin.assert_states_and_times([(0.0, False), (0.0, True), (build_s, False)])
            assert len(conveyor.states) == 3
            conveyor.assert_states_and_times([(0.0, False), (build_s, True), (TRANSIT_S / speed, False)])

    run(scenario)


# -- 8. workflow steps -------------------------------------------------------------------


def test_a_completed_order_records_exactly_the_workflow_steps_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with plant(make_config(tmp_path, speed=50)) as p:
            await p.submit_all([order("st", 2)])
            await p.until(lambda s: "st" not in s.work_items)
            records = p.records()

        steps = [(e.step, e.name) for e in events_of(records, ev.StepCompleted) if e.order_id == "st"]
        assert steps == list(enumerate(STEP_NAMES))
        assert history(records, "st")[-2:] == ["StepCompleted", "TidiedUp"]

    run(scenario)


class RecordingDevices(Devices):
    """The agent's devices, keeping hold of their output pins so that they can be looked at after closing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output_pins = {name: device.pin for name, device in self.outputs.items()}


def test_a_log_written_by_another_workflow_version_stops_the_start_with_every_output_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, speed=50)
    with Journal.open(config.events_db) as journal:
        journal.append(
            [ev.OrderAccepted("old-1", "widget-a", 1, "WH1", 0, "d"), ev.StepCompleted("old-1", 0, "old_step_name")]
        )
    monkeypatch.setattr("edge_agent.agent.Devices", RecordingDevices)

    async def scenario() -> None:
        agent = Agent(config)
        with pytest.raises(WorkflowMismatch) as caught:
            async with agent:
                pytest.fail("the agent started")
        message = str(caught.value)
        assert "old-1" in message
        assert "'old_step_name'" in message
        assert f"'{STEP_NAMES[0]}'" in message
        devices = agent.devices
        assert isinstance(devices, RecordingDevices)
        assert set(devices.output_pins) == set(OUTPUTS)
        for name, pin in devices.output_pins.items():
            assert [bool(s.state) for s in pin.states] == [False], name  # never on, not for an instant
        # The refused start released the pins and the log.
        assert all(device.closed for device in devices.outputs.values())
        with pytest.raises(sqlite3.ProgrammingError):
            agent.journal.log.head()

    run(scenario)
    with EventLog(config.events_db, readonly=True) as log:
        assert log.head().seq == 2  # the refused start wrote nothing


# -- 9. restart --------------------------------------------------------------------------


def test_a_restart_resumes_every_item_at_its_step_and_completes_it_exactly_once(tmp_path: Path) -> None:
    config = make_config(tmp_path, speed=20)
    orders = [
        order(f"p{n}", qty, priority=p) for n, (qty, p) in enumerate([(1, 3), (1, 3), (6, 2), (6, 2), (6, 1), (2, 0)])
    ]
    qty = {o.order_id: o.qty for o in orders}
    live = {Stage.FACTORY_READY, Stage.FACTORY_ACCEPTED, Stage.MOVE_TO_WAREHOUSE}

    async def first_run() -> State:
        async with plant(config) as p:
            pins = [p.pin(name) for name in OUTPUTS]
            await p.engage_estop()
            await p.submit_all(orders)
            await p.until(lambda s: len(s.work_items) == len(orders))
            p.agent.devices.drive_input(ESTOP, False)
            await p.until(
                lambda s: (
                    live <= set(stages(s).values())
                    and any(i.units_done for i in s.work_items.values() if i.stage is Stage.FACTORY_ACCEPTED)
                )
            )
        assert not any(pin.state for pin in pins)  # stopped in order: every output off
        return p.state

    async def second_run(stopped: State) -> None:
        async with plant(config) as p:
            resumed = p.state
            for order_id, item in stopped.work_items.items():
                again = resumed.work_items[order_id]
                assert (again.stage, again.steps_done, again.units_done) == (
                    item.stage,
                    item.steps_done,
                    item.units_done,
                )
            assert resumed.stations == stopped.stations
            assert resumed.lane == stopped.lane
            await p.until(lambda s: not s.work_items)
            records = p.records()
        assert_completed_once(records, qty, qty)
        assert_assigned_by_priority_then_age(records)
        kinds = Counter(type(r.event).__name__ for r in records)
        assert (kinds["AgentStarted"], kinds["AgentStopped"]) == (2, 1)  # read while the second run still runs

    stopped = asyncio.run(first_run())
    assert live <= set(stages(stopped).values())  # stopped with items waiting, building and moving
    assert events_of(stopped_records(config), ev.AgentStopped)
    asyncio.run(second_run(stopped))


def stopped_records(config: Config) -> list[ev.Recorded]:
    with EventLog(config.events_db, readonly=True) as log:
        return list(log.read())


# -- a station's fault input ----------------------------------------------------------


@pytest.mark.parametrize("on_fault", ["fail", "retry"])
def test_a_fault_pulse_fails_the_build_or_retries_it_as_the_profile_says(tmp_path: Path, on_fault: str) -> None:
    profile = tmp_path / "profile.yaml"
    text = PROFILE.read_text(encoding="utf-8")
    profile.write_text(text.replace("fault: {pin: 22}", f"fault: {{pin: 22}}\n    on_fault: {on_fault}"), "utf-8")
    config = make_config(tmp_path, speed=50.0).model_copy(update={"profile": profile})

    async def scenario() -> None:
        async with plant(config) as p:
            p.simulator.jammed.add("s1")  # no unit comes before the fault
            await p.submit_all([order("f1")])
            await p.until(lambda s: s.work_items["f1"].station == "s1")
            p.agent.devices.pulse_input(station_input("s1", FAULT))
            await p.until(lambda s: (item := s.work_items.get("f1")) is None or item.attempt == 1)
            p.simulator.jammed.discard("s1")
            await p.until(lambda s: "f1" not in s.work_items)
            records = p.records()

        reason = "station s1 reported a fault"
        if on_fault == "fail":
            assert [r.reason for r in events_of(records, ev.OrderFailed)] == [reason]
        else:
            assert [(r.attempt, r.reason) for r in events_of(records, ev.RetryScheduled)] == [(1, reason)]
            assert_completed_once(records, ["f1"], {"f1": 1})

    run(scenario)
