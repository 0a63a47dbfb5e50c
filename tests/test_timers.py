"""Durable timeouts, retries with capped backoff, e-stop freezing, validation,
workflow steps and outputs: the rules that the workflow relies on."""

from __future__ import annotations

from datetime import timedelta

import pytest

from edge_agent.cell import CONVEYOR, STATUS_LED
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.decide import decide
from edge_agent.domain.outputs import desired_outputs
from edge_agent.domain.state import Policy, Stage, State
from edge_agent.errors import CommandRejected, InvalidEvent
from tests.support.orders import order
from tests.support.plant import PRODUCTS, STATIONS, T0, apply

POLICY = Policy(unit_timeout_s=10, transit_timeout_s=20, retries=2, backoff_s=1, backoff_max_s=1.5)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Cell:
    """A state moved along by commands at chosen times."""

    def __init__(self, policy: Policy = POLICY) -> None:
        self.state, _ = apply(State(), cmd.ConfigurePlant(STATIONS, PRODUCTS, policy))

    def do(self, command: cmd.Command, t: float = 0) -> list[ev.Event]:
        self.state, records = apply(self.state, command, T0 + timedelta(seconds=t))
        return [r.event for r in records]

    def tick(self, t: float) -> list[ev.Event]:
        """Time `t` has come on a steady clock: every item whose logged deadline has passed is due."""
        due = tuple(
            i.order_id for i in self.state.work_items.values() if (m := i.paused_until or i.deadline) and m <= at(t)
        )
        return self.do(cmd.Tick(due), t)

    def building(self, order_id: str = "o1", qty: int = 3) -> None:
        self.do(order(order_id, qty))
        self.do(cmd.QueueOrder(order_id))
        self.do(cmd.AssignStations())


def test_a_station_assignment_arms_the_unit_timeout() -> None:
    cell = Cell()
    cell.building()
    item = cell.state.work_items["o1"]
    assert (item.timer, item.deadline) == ("unit", at(10))
    assert cell.tick(9.9) == []


def test_a_unit_timeout_retries_with_capped_backoff_then_fails_with_the_reason() -> None:
    cell = Cell()
    cell.building()
    assert cell.tick(10) == [
        ev.RetryScheduled("o1", 1, "no unit from station s1 within 10 s", at(11)),
    ]
    assert desired_outputs(cell.state)["s1.run"] is False  # held off during the backoff
    assert cell.do(cmd.RecordUnit("s1"), 10.5) == []  # a pulse while off builds nothing
    assert cell.tick(11) == [ev.TimerArmed("o1", "unit", at(21))]
    assert desired_outputs(cell.state)["s1.run"] is True
    assert cell.tick(21)[0].resume_at == at(22.5)  # type: ignore[union-attr]  # 2 s capped at 1.5
    cell.tick(22.5)
    (failed,) = cell.tick(32.5)
    assert failed == ev.OrderFailed("o1", "no unit from station s1 within 10 s (gave up after 2 retries)")
    assert cell.state.work_items["o1"].stage is Stage.FAILED
    assert cell.state.stations[0].order_id is None
    assert desired_outputs(cell.state)["s1.run"] is False


def test_each_unit_rearms_the_timeout_and_completion_stops_it() -> None:
    cell = Cell()
    cell.building(qty=2)
    cell.do(cmd.RecordUnit("s1"), 8)
    assert cell.state.work_items["o1"].deadline == at(18)
    assert cell.tick(17) == []
    cell.do(cmd.RecordUnit("s1"), 17)
    item = cell.state.work_items["o1"]
    assert (item.stage, item.timer, item.deadline) == (Stage.FACTORY_COMPLETE, None, None)
    assert cell.tick(100) == []


def test_a_transit_timeout_retries_the_conveyor_then_fails_and_frees_the_lane() -> None:
    cell = Cell(Policy(unit_timeout_s=10, transit_timeout_s=20, retries=1, backoff_s=2))
    cell.building(qty=1)
    cell.do(cmd.RecordUnit("s1"))
    assert cell.do(cmd.StartShipment(), 1) == [ev.ShipmentStarted("o1"), ev.TimerArmed("o1", "transit", at(21))]
    assert desired_outputs(cell.state)[CONVEYOR] is True
    cell.tick(21)
    assert desired_outputs(cell.state)[CONVEYOR] is False
    assert cell.tick(23) == [ev.TimerArmed("o1", "transit", at(43))]
    (failed,) = cell.tick(43)
    assert failed == ev.OrderFailed("o1", "batch did not arrive within 20 s (gave up after 1 retries)")
    assert cell.state.lane.order_id is None
    assert desired_outputs(cell.state)[CONVEYOR] is False


def test_the_estop_freezes_timeouts_and_resumes_them_exactly_on_release() -> None:
    cell = Cell()
    cell.building()
    cell.do(cmd.EngageEstop(), 4)
    assert cell.tick(50) == []  # frozen: no timeout while stopped
    assert set(desired_outputs(cell.state).values()) == {False}
    cell.do(cmd.ReleaseEstop(), 104)  # stopped for 100 s
    assert cell.state.work_items["o1"].deadline == at(110)
    assert desired_outputs(cell.state)["s1.run"] is True
    assert desired_outputs(cell.state)[STATUS_LED] is True
    assert cell.tick(109.9) == []
    assert cell.tick(110)[0] == ev.RetryScheduled("o1", 1, "no unit from station s1 within 10 s", at(111))


def test_the_estop_also_freezes_a_retry_pause() -> None:
    cell = Cell()
    cell.building()
    cell.tick(10)  # paused until 11
    cell.do(cmd.EngageEstop(), 10.5)
    cell.do(cmd.ReleaseEstop(), 20.5)
    assert cell.state.work_items["o1"].paused_until == at(21)


def test_a_fault_fails_the_build_or_retries_it_per_policy() -> None:
    cell = Cell()
    cell.building()
    assert cell.do(cmd.RecordFault("s1")) == [ev.OrderFailed("o1", "station s1 reported a fault")]
    retrying = Cell(Policy(fault_retried=("s1",)))
    retrying.building()
    (retry,) = retrying.do(cmd.RecordFault("s1"))
    assert isinstance(retry, ev.RetryScheduled)
    assert retry.reason == "station s1 reported a fault"


def test_validation_fails_an_unknown_product_or_a_quantity_out_of_range() -> None:
    cell = Cell()
    cell.do(order("x", product="sprocket"))
    cell.do(order("y", 101))
    assert cell.do(cmd.QueueOrder("x")) == [ev.OrderFailed("x", "product 'sprocket' is not made by this cell")]
    assert cell.do(cmd.QueueOrder("y")) == [ev.OrderFailed("y", "qty 101 is outside 1..100 for widget-a")]


def test_workflow_steps_are_numbered_in_order() -> None:
    cell = Cell()
    cell.do(order("o1", 2))
    assert cell.do(cmd.CompleteStep("o1", "validate")) == [ev.StepCompleted("o1", 0, "validate")]
    assert cell.do(cmd.CompleteStep("o1", "send_to_factory")) == [ev.StepCompleted("o1", 1, "send_to_factory")]
    assert cell.state.work_items["o1"].steps_done == ("validate", "send_to_factory")
    with pytest.raises(InvalidEvent, match="step 5"):
        apply_event(cell.state, ev.StepCompleted("o1", 5, "tidy_up"))


def apply_event(state: State, event: ev.Event) -> State:
    from edge_agent.domain.evolve import evolve

    return evolve(state, ev.Recorded(state.last_seq + 1, at(0), event))


def test_an_unchanged_plant_configuration_logs_nothing() -> None:
    cell = Cell()
    assert cell.do(cmd.ConfigurePlant(STATIONS, PRODUCTS, POLICY)) == []
    assert cell.do(cmd.ConfigurePlant(STATIONS, PRODUCTS, Policy())) != []
    with pytest.raises(CommandRejected, match="repeat"):
        decide(cell.state, cmd.ConfigurePlant(("a", "a")), T0)
