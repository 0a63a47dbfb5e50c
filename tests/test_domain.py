"""The pure core: decide's rules, and replay as a fold (property tests)."""

from __future__ import annotations

import random
import tempfile
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.codec import event_from_json, events_to_json, state_from_dict, state_to_dict
from edge_agent.domain.decide import admit, decide
from edge_agent.domain.evolve import evolve, fold
from edge_agent.domain.state import Policy, Stage, State
from edge_agent.domain.view import state_view
from edge_agent.errors import CommandRejected, InvalidEvent
from edge_agent.log.journal import Journal
from tests.support.orders import order
from tests.support.plant import PRODUCTS, STATIONS, T0, apply, record

ORDER_IDS = [f"o{i}" for i in range(8)]


def plant(*commands: cmd.Command) -> State:
    state, _ = apply(State(), cmd.ConfigurePlant(STATIONS, PRODUCTS))
    for command in commands:
        state, _ = apply(state, command)
    return state


# -- decide: the rules -----------------------------------------------------------


def test_a_redelivered_order_is_not_a_new_work_item() -> None:
    first = order("o1", 2)
    assert admit(first, first.digest, open_items=0, max_open=10) == []


def test_the_same_order_id_with_another_body_is_rejected_as_a_conflict() -> None:
    (event,) = admit(order("o1", 3), order("o1", 2).digest, open_items=0, max_open=10)
    assert isinstance(event, ev.OrderRejected)
    assert "conflicting duplicate" in event.reason


def test_a_new_order_past_the_open_limit_is_rejected_as_queue_full() -> None:
    first = order("o1", 2)
    (event,) = admit(first, None, open_items=10, max_open=10)
    assert event == ev.OrderRejected("o1", "queue full: 10 open")
    # a duplicate is still a duplicate, and a conflict a conflict, when the queue is full
    assert admit(first, first.digest, open_items=10, max_open=10) == []
    (conflict,) = admit(first, "other", open_items=10, max_open=10)
    assert isinstance(conflict, ev.OrderRejected)
    assert "conflicting duplicate" in conflict.reason
    (accepted,) = admit(order("o1", 2), None, open_items=9, max_open=10)
    assert isinstance(accepted, ev.OrderAccepted)


def test_the_state_counts_accepted_orders_and_keeps_no_history_of_them() -> None:
    state = plant(order("o1", 1), cmd.QueueOrder("o1"), cmd.AssignStations(), cmd.RecordUnit("s1"))
    state = plant_more(state, cmd.StartShipment(), cmd.RecordArrival(), cmd.TidyUp("o1"))
    assert "o1" not in state.work_items
    assert state.accepted == 1
    assert "o1" not in orjson.dumps(state_to_dict(state)).decode()


def plant_more(state: State, *commands: cmd.Command) -> State:
    for command in commands:
        state, _ = apply(state, command)
    return state


def test_stations_go_to_the_highest_priority_then_the_oldest() -> None:
    state = plant(
        order("low-old", 2, priority=0),
        order("high-new", 2, priority=5),
        order("low-new", 2, priority=0),
        order("high-newer", 2, priority=5),
        *(cmd.QueueOrder(o) for o in ("low-old", "high-new", "low-new", "high-newer")),
    )
    events = [e for e in decide(state, cmd.AssignStations(), T0) if isinstance(e, ev.StationAssigned)]
    assert events == [
        ev.StationAssigned("high-new", "s1"),
        ev.StationAssigned("high-newer", "s2"),
        ev.StationAssigned("low-old", "s3"),
    ]


def test_units_complete_the_build_then_the_batch_ships_and_gets_the_next_inventory_id() -> None:
    state = plant(order("o1", 2), cmd.QueueOrder("o1"), cmd.AssignStations())
    assert decide(state, cmd.RecordUnit("s1"), T0) == [
        ev.UnitBuilt("o1", "s1"),
        ev.TimerArmed("o1", "unit", "2026-01-01T00:00:30.000000Z"),  # the next unit is due within 30 s
    ]
    state = plant_more(state, cmd.RecordUnit("s1"))
    assert state.work_items["o1"].progress == 50
    assert decide(state, cmd.RecordUnit("s1"), T0) == [ev.UnitBuilt("o1", "s1"), ev.BuildComplete("o1", "s1")]
    state = plant_more(state, cmd.RecordUnit("s1"), cmd.StartShipment())
    assert state.lane.order_id == "o1"
    assert state.stations[0].order_id is None  # s1 is free again
    assert decide(state, cmd.RecordArrival(), T0) == [
        ev.ShipmentArrived("o1"),
        ev.InventoryIssued("o1", "INV00001", "widget-a", 2, "WH1"),
    ]


def test_emergency_stop_blocks_new_builds_units_and_shipments_until_released() -> None:
    state = plant(order("o1", 2), cmd.QueueOrder("o1"), cmd.EngageEstop())
    assert decide(state, cmd.AssignStations(), T0) == []
    assert decide(state, cmd.EngageEstop(), T0) == []
    state = plant_more(state, cmd.ReleaseEstop(), cmd.AssignStations(), cmd.EngageEstop())
    assert decide(state, cmd.RecordUnit("s1"), T0) == []
    state = plant_more(state, cmd.ReleaseEstop())
    assert decide(state, cmd.RecordUnit("s1"), T0)[0] == ev.UnitBuilt("o1", "s1")


def test_cancel_frees_the_station_but_is_refused_once_the_build_is_complete() -> None:
    state = plant(order("o1", 1), order("o2", 1), cmd.QueueOrder("o1"), cmd.QueueOrder("o2"))
    state = plant_more(state, cmd.AssignStations(), cmd.CancelOrder("o1"))
    assert state.work_items["o1"].stage is Stage.CANCELLED
    assert state.stations[0].order_id is None  # s1 is free again
    state = plant_more(state, cmd.RecordUnit("s2"))
    with pytest.raises(CommandRejected, match="FactoryComplete"):
        decide(state, cmd.CancelOrder("o2"), T0)
    with pytest.raises(CommandRejected, match="not a live work item"):
        decide(state, cmd.CancelOrder("nope"), T0)


def test_a_unit_pulse_on_an_idle_station_builds_nothing_and_an_unknown_station_is_an_error() -> None:
    state = plant()
    assert decide(state, cmd.RecordUnit("s2"), T0) == []
    with pytest.raises(CommandRejected):
        decide(state, cmd.RecordUnit("s9"), T0)


def test_wait_and_build_times_come_from_the_event_timestamps() -> None:
    state = plant(order("o1", 2))
    state, _ = apply(state, cmd.QueueOrder("o1"), T0)
    state, _ = apply(state, cmd.AssignStations(), T0 + timedelta(seconds=4))
    item = state.work_items["o1"]
    assert item.wait_s(T0 + timedelta(seconds=10)) == 4.0
    assert item.build_s(T0 + timedelta(seconds=10)) == 6.0
    assert state_view(state)["work_items"][0]["build_s"] == 0.0  # as of the last event


def test_fold_refuses_a_gap_in_the_seqs() -> None:
    with pytest.raises(InvalidEvent, match="expected seq 1"):
        fold(State(), [ev.Recorded(2, "2026-01-01T00:00:00.000000Z", ev.EstopEngaged())])


# -- replay is a fold: properties over any valid history ------------------------

# Weighted towards progress, so that histories reach the warehouse as well as the failure paths.
KINDS = [
    *["submit", "queue", "assign", "tidy"] * 3,
    *["unit"] * 8,
    *["ship", "arrive"] * 2,
    *["reject", "fail", "cancel", "estop", "plant"],
]


def random_command(rnd: random.Random, state: State) -> cmd.Command:
    """A command, mostly about the live work items, so histories get far."""
    if state.estop and rnd.random() < 0.3:
        return cmd.ReleaseEstop()
    live = sorted(state.work_items)
    order_id = rnd.choice(live) if live and rnd.random() < 0.9 else rnd.choice(ORDER_IDS)
    kind = rnd.choice(KINDS)
    if kind == "submit":
        # A new order: a redelivery or a conflict is decided against the log's idempotency
        # record, not by `decide` (tests/test_idempotency.py).
        order_id = f"o{state.accepted}"
        product = rnd.choice(["widget-a", "gadget-b"])
        digest = rnd.choice(["d1", "d1", "d1", "d2"])
        return cmd.SubmitOrder(order_id, product, rnd.randint(1, 3), "WH1", rnd.randint(0, 3), digest)
    if kind == "unit":
        busy = [s.id for s in state.stations if s.order_id is not None]
        return cmd.RecordUnit(rnd.choice(busy if busy and rnd.random() < 0.8 else STATIONS))
    if kind == "estop":
        return cmd.ReleaseEstop() if state.estop else cmd.EngageEstop()
    others: dict[str, cmd.Command] = {
        "reject": cmd.RejectOrder(rnd.choice([None, order_id]), "bad input"),
        "queue": cmd.QueueOrder(order_id),
        "assign": cmd.AssignStations(),
        "ship": cmd.StartShipment(),
        "arrive": cmd.RecordArrival(),
        "fail": cmd.FailOrder(order_id, "unit timeout"),
        "cancel": cmd.CancelOrder(order_id),
        "tidy": cmd.TidyUp(order_id),
        "plant": cmd.ConfigurePlant(STATIONS, PRODUCTS),
    }
    return others[kind]


@st.composite
def histories(draw: st.DrawFn) -> list[ev.Recorded]:
    """A valid event history: what decide produces for a random run of commands."""
    rnd = draw(st.randoms(use_true_random=False))
    state = plant()
    records = record(State(), decide(State(), cmd.ConfigurePlant(STATIONS, PRODUCTS), T0))
    at = T0
    for _ in range(draw(st.integers(0, 300))):
        at += timedelta(seconds=rnd.randint(0, 30))
        try:
            state, new = apply(state, random_command(rnd, state), at)
        except CommandRejected:
            continue
        records += new
    return records


@settings(max_examples=150, deadline=None)
@given(histories(), st.data())
def test_folding_at_once_in_pieces_through_snapshots_and_one_by_one_agree(
    records: list[ev.Recorded], data: st.DataObject
) -> None:
    at_once = fold(State(), records)

    one_by_one = State()
    for r in records:
        one_by_one = evolve(one_by_one, r)

    cuts = sorted(data.draw(st.lists(st.integers(0, len(records)), max_size=5)))
    pieces, start = State(), 0
    for cut in [*cuts, len(records)]:
        pieces = fold(pieces, records[start:cut])
        pieces = state_from_dict(state_to_dict(pieces))  # a snapshot taken here
        start = cut

    assert at_once == one_by_one == pieces
    assert at_once.last_seq == len(records)


@settings(max_examples=150, deadline=None)
@given(histories())
def test_every_history_keeps_the_cell_consistent(records: list[ev.Recorded]) -> None:
    state = fold(State(), records)
    issued = [r.event.inventory_id for r in records if isinstance(r.event, ev.InventoryIssued)]
    assert issued == [f"INV{n:05d}" for n in range(1, len(issued) + 1)]
    assert state.inventory_seq == len(issued)
    building = [s.order_id for s in state.stations if s.order_id is not None]
    assert len(building) == len(set(building))
    for order_id in building:
        assert state.work_items[order_id].stage is Stage.FACTORY_ACCEPTED
    for order_id in state.lane.queue:
        assert state.work_items[order_id].stage is Stage.FACTORY_COMPLETE
    for r in records:  # every event survives its JSON form unchanged
        assert event_from_json(type(r.event).__name__, events_to_json([r.event])[0]) == r.event


@settings(max_examples=40, deadline=None)
@given(histories(), st.integers(10, 40), st.integers(1, 7))
def test_a_restart_from_snapshot_and_tail_equals_full_replay(
    records: list[ev.Recorded], snapshot_every: int, batch: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "events.db"
        with Journal.open(path, snapshot_every=snapshot_every) as journal:
            events = [r.event for r in records]
            for start in range(0, len(events), batch):
                journal.append(events[start : start + batch])
            live = journal.state
        with Journal.open(path, snapshot_every=snapshot_every) as restarted:
            full_replay = fold(State(), restarted.log.read())  # every event from seq 1, no snapshot
            assert restarted.state == full_replay == live
            assert restarted.state.last_seq == len(records)


def test_an_older_logs_policy_with_on_fault_still_reads_as_retrying_no_fault() -> None:
    """Before a station's `on_fault`, the policy held a cell-wide `on_fault`, always "fail"."""
    old = '{"stations":["s1"],"products":[["w",3]],"policy":{"unit_timeout_s":30.0,"transit_timeout_s":60.0,"retries":2,"backoff_s":1.0,"backoff_max_s":30.0,"on_fault":"fail"}}'  # noqa: E501
    event = event_from_json("PlantConfigured", old)
    assert isinstance(event, ev.PlantConfigured)
    assert event.policy == Policy(unit_timeout_s=30.0, transit_timeout_s=60.0, retries=2, fault_retried=())
    snapshot = state_to_dict(State(policy=event.policy))
    snapshot["policy"] = {**snapshot["policy"], "on_fault": "fail"}
    del snapshot["policy"]["fault_retried"]
    assert state_from_dict(snapshot).policy == event.policy
