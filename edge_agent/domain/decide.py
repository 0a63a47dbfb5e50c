"""decide(state, command, now) -> events: the rules of the cell.

Pure: the same state, command and time always give the same events. An empty
list means the command changes nothing (a redelivered order, a sensor pulse
with nothing to count); `CommandRejected` means it was asked for wrongly.
"""

from __future__ import annotations

import heapq
from datetime import datetime
from typing import assert_never

from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.moments import iso, later
from edge_agent.domain.state import (
    CANCELLABLE_STAGES,
    FINISHED_STAGES,
    Stage,
    State,
    WorkItem,
    inventory_id,
)
from edge_agent.errors import CommandRejected

UNIT_TIMER = "unit"
TRANSIT_TIMER = "transit"


def decide(state: State, command: cmd.Command, now: datetime) -> list[ev.Event]:
    """The events that carry out `command` in `state` at `now` (none if nothing changes)."""
    at = iso(now)
    match command:
        case cmd.SubmitOrder():
            # The order's id is taken to be new here: the record of the ids already used is
            # kept beside the log, and `admit` decides an order against it.
            return admit(command, None, open_items=len(state.work_items), max_open=None)
        case cmd.RejectOrder(order_id, reason):
            return [ev.OrderRejected(order_id, reason)]
        case cmd.ConfigurePlant(stations, products, policy):
            if len(set(stations)) != len(stations):
                raise CommandRejected(f"station ids repeat: {stations}")
            if (stations, dict(products), policy) == (
                tuple(s.id for s in state.stations),
                dict(state.products.items()),
                state.policy,
            ):
                return []
            return [ev.PlantConfigured(stations, products, policy)]
        case cmd.QueueOrder(order_id):
            return _validate(state, _require(state, order_id, {Stage.NEW}, "queued"))
        case cmd.AssignStations():
            return _assign_stations(state, at)
        case cmd.RecordUnit(station_id):
            return _record_unit(state, station_id, at)
        case cmd.RecordFault(station_id):
            return _record_fault(state, station_id, at)
        case cmd.StartShipment():
            if state.estop or state.lane.order_id is not None or not state.lane.queue:
                return []
            order_id = state.lane.queue[0]
            deadline = later(at, state.policy.transit_timeout_s)
            return [ev.ShipmentStarted(order_id), ev.TimerArmed(order_id, TRANSIT_TIMER, deadline)]
        case cmd.RecordArrival():
            moving = state.lane.order_id
            if moving is None or state.estop or state.work_items[moving].paused_until is not None:
                return []  # the conveyor is stopped: nothing can have arrived
            item = state.work_items[moving]
            issued = inventory_id(state.inventory_seq + 1)
            return [
                ev.ShipmentArrived(moving),
                ev.InventoryIssued(moving, issued, item.product_id, item.qty, item.warehouse),
            ]
        case cmd.Tick(due):
            return [] if state.estop else _tick(state, due, at)
        case cmd.RearmTimers():
            return [] if state.estop else _rearm(state, at)
        case cmd.FailOrder(order_id, reason):
            _require(state, order_id, set(Stage) - FINISHED_STAGES, "failed")
            return [ev.OrderFailed(order_id, reason)]
        case cmd.CancelOrder(order_id):
            _require(state, order_id, CANCELLABLE_STAGES, "cancelled")
            return [ev.OrderCancelled(order_id)]
        case cmd.TidyUp(order_id):
            _require(state, order_id, FINISHED_STAGES, "tidied up")
            return [ev.TidiedUp(order_id)]
        case cmd.CompleteStep(order_id, name):
            item = _require(state, order_id, set(Stage), "stepped")
            return [ev.StepCompleted(order_id, len(item.steps_done), name)]
        case cmd.RecordStart(version, profile):
            return [ev.AgentStarted(version, profile)]
        case cmd.RecordStop(reason):
            return [ev.AgentStopped(reason)]
        case cmd.EngageEstop():
            return [] if state.estop else [ev.EstopEngaged()]
        case cmd.ReleaseEstop():
            return [ev.EstopReleased()] if state.estop else []
        case _:  # mypy names here any command the cases above leave out
            assert_never(command)


def _require(state: State, order_id: str, stages: set[Stage] | frozenset[Stage], doing: str) -> WorkItem:
    item = state.work_items.get(order_id)
    if item is None:
        raise CommandRejected(f"order {order_id!r} is not a live work item")
    if item.stage not in stages:
        raise CommandRejected(f"order {order_id!r} is {item.stage} and cannot be {doing}")
    return item


CONFLICT_REASON = "conflicting duplicate: order_id already used with another body"


def admit(order: cmd.SubmitOrder, known: str | None, *, open_items: int, max_open: int | None) -> list[ev.Event]:
    """The events for an inbound order, given the digest already recorded under its id
    (`known`, None if the id is new) and how many work items are open against the limit:
    a duplicate first (nothing: it is already a work item, or was one), then a conflict,
    then a full queue (rejected, so that the sender knows), and only then acceptance."""
    if known == order.digest:
        return []  # a redelivery or a retry by the sender
    if known is not None:
        return [ev.OrderRejected(order.order_id, CONFLICT_REASON)]
    if max_open is not None and open_items >= max_open:
        return [ev.OrderRejected(order.order_id, f"queue full: {open_items} open")]
    return [
        ev.OrderAccepted(order.order_id, order.product_id, order.qty, order.warehouse, order.priority, order.digest)
    ]


def _validate(state: State, item: WorkItem) -> list[ev.Event]:
    max_qty = state.products.get(item.product_id)
    if max_qty is None:
        return [ev.OrderFailed(item.order_id, f"product {item.product_id!r} is not made by this cell")]
    if not 1 <= item.qty <= max_qty:
        return [ev.OrderFailed(item.order_id, f"qty {item.qty} is outside 1..{max_qty} for {item.product_id}")]
    return [ev.OrderQueued(item.order_id)]


def _assign_stations(state: State, at: str) -> list[ev.Event]:
    if state.estop:
        return []
    idle = [s.id for s in state.stations if s.order_id is None]
    if not idle:
        return []
    waiting = heapq.nsmallest(  # not a sort: a long queue is scanned once for the few it needs
        len(idle),
        (item for item in state.work_items.values() if item.stage is Stage.FACTORY_READY),
        key=lambda item: (-item.priority, item.accepted_seq),
    )
    deadline = later(at, state.policy.unit_timeout_s)
    events: list[ev.Event] = []
    for station, item in zip(idle, waiting, strict=False):
        events += [ev.StationAssigned(item.order_id, station), ev.TimerArmed(item.order_id, UNIT_TIMER, deadline)]
    return events


def _building(state: State, station_id: str) -> WorkItem | None:
    """The item the station is building right now, if its output is on."""
    station = state.station(station_id)
    if station is None:
        raise CommandRejected(f"no station {station_id!r}")
    if state.estop or station.order_id is None:
        return None
    item = state.work_items[station.order_id]
    return None if item.paused_until is not None else item


def _record_unit(state: State, station_id: str, at: str) -> list[ev.Event]:
    item = _building(state, station_id)
    if item is None:
        return []  # a pulse while the station is off: nothing was built
    if item.units_done + 1 >= item.qty:
        return [ev.UnitBuilt(item.order_id, station_id), ev.BuildComplete(item.order_id, station_id)]
    deadline = later(at, state.policy.unit_timeout_s)
    return [ev.UnitBuilt(item.order_id, station_id), ev.TimerArmed(item.order_id, UNIT_TIMER, deadline)]


def _record_fault(state: State, station_id: str, at: str) -> list[ev.Event]:
    item = _building(state, station_id)
    if item is None:
        return []
    reason = f"station {station_id} reported a fault"
    if station_id in state.policy.fault_retried:
        return _retry_or_fail(state, item, reason, at)
    return [ev.OrderFailed(item.order_id, reason)]


def _tick(state: State, due: tuple[str, ...], at: str) -> list[ev.Event]:
    events: list[ev.Event] = []
    for order_id in due:
        item = state.work_items.get(order_id)
        if item is None:
            continue
        if item.paused_until is not None:  # the pause is over: try again
            timer = item.timer or UNIT_TIMER
            events.append(ev.TimerArmed(item.order_id, timer, later(at, _timeout(state, timer))))
        elif item.deadline is not None:
            events += _retry_or_fail(state, item, _timeout_reason(state, item), at)
    return events


def _rearm(state: State, at: str) -> list[ev.Event]:
    return [
        ev.TimerArmed(item.order_id, item.timer, later(at, _timeout(state, item.timer)))
        for item in state.work_items.values()
        if item.timer is not None and (item.deadline or item.paused_until)
    ]


def _timeout(state: State, timer: str | None) -> float:
    return state.policy.transit_timeout_s if timer == TRANSIT_TIMER else state.policy.unit_timeout_s


def _timeout_reason(state: State, item: WorkItem) -> str:
    if item.timer == TRANSIT_TIMER:
        return f"batch did not arrive within {state.policy.transit_timeout_s:g} s"
    return f"no unit from station {item.station} within {state.policy.unit_timeout_s:g} s"


def _retry_or_fail(state: State, item: WorkItem, reason: str, at: str) -> list[ev.Event]:
    attempt = item.attempt + 1
    if attempt > state.policy.retries:
        return [ev.OrderFailed(item.order_id, f"{reason} (gave up after {state.policy.retries} retries)")]
    return [ev.RetryScheduled(item.order_id, attempt, reason, later(at, state.policy.backoff(attempt)))]
