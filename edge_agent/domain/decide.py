"""decide(state, command, now) -> events: the rules of the cell.

Pure: the same state, command and time always give the same events. An empty
list means the command changes nothing (a redelivered order, a sensor pulse
with nothing to count); `CommandRejected` means it was asked for wrongly.
"""

from __future__ import annotations

from datetime import datetime

from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.state import CANCELLABLE_STAGES, FINISHED_STAGES, Stage, State, WorkItem, inventory_id
from edge_agent.errors import CommandRejected


def decide(state: State, command: cmd.Command, now: datetime) -> list[ev.Event]:
    """The events that carry out `command` in `state` (none if nothing changes)."""
    match command:
        case cmd.SubmitOrder():
            return _submit(state, command)
        case cmd.RejectOrder(order_id, reason):
            return [ev.OrderRejected(order_id, reason)]
        case cmd.ConfigurePlant(stations):
            if len(set(stations)) != len(stations):
                raise CommandRejected(f"station ids repeat: {stations}")
            if stations == tuple(s.id for s in state.stations):
                return []
            return [ev.PlantConfigured(stations)]
        case cmd.QueueOrder(order_id):
            _require(state, order_id, {Stage.NEW}, "queued")
            return [ev.OrderQueued(order_id)]
        case cmd.AssignStations():
            return _assign_stations(state)
        case cmd.RecordUnit(station_id):
            return _record_unit(state, station_id)
        case cmd.StartShipment():
            if state.estop or state.lane.order_id is not None or not state.lane.queue:
                return []
            return [ev.ShipmentStarted(state.lane.queue[0])]
        case cmd.RecordArrival():
            moving = state.lane.order_id
            if moving is None:
                return []
            return [ev.ShipmentArrived(moving), ev.InventoryIssued(moving, inventory_id(state.inventory_seq + 1))]
        case cmd.FailOrder(order_id, reason):
            _require(state, order_id, set(Stage) - FINISHED_STAGES, "failed")
            return [ev.OrderFailed(order_id, reason)]
        case cmd.CancelOrder(order_id):
            _require(state, order_id, CANCELLABLE_STAGES, "cancelled")
            return [ev.OrderCancelled(order_id)]
        case cmd.TidyUp(order_id):
            _require(state, order_id, FINISHED_STAGES, "tidied up")
            return [ev.TidiedUp(order_id)]
        case cmd.EngageEstop():
            return [] if state.estop else [ev.EstopEngaged()]
        case cmd.ReleaseEstop():
            return [ev.EstopReleased()] if state.estop else []


def _require(state: State, order_id: str, stages: set[Stage] | frozenset[Stage], doing: str) -> WorkItem:
    item = state.work_items.get(order_id)
    if item is None:
        raise CommandRejected(f"order {order_id!r} is not a live work item")
    if item.stage not in stages:
        raise CommandRejected(f"order {order_id!r} is {item.stage} and cannot be {doing}")
    return item


def _submit(state: State, order: cmd.SubmitOrder) -> list[ev.Event]:
    known = state.orders.get(order.order_id)
    if known == order.digest:
        return []  # a redelivery or a retry by the sender: already a work item
    if known is not None:
        return [ev.OrderRejected(order.order_id, "conflicting duplicate: order_id already used with another body")]
    return [
        ev.OrderAccepted(order.order_id, order.product_id, order.qty, order.warehouse, order.priority, order.digest)
    ]


def _assign_stations(state: State) -> list[ev.Event]:
    if state.estop:
        return []
    idle = [s.id for s in state.stations if s.order_id is None]
    if not idle:
        return []
    waiting = sorted(
        (item for item in state.work_items.values() if item.stage is Stage.FACTORY_READY),
        key=lambda item: (-item.priority, item.accepted_seq),
    )
    return [ev.StationAssigned(item.order_id, station) for station, item in zip(idle, waiting, strict=False)]


def _record_unit(state: State, station_id: str) -> list[ev.Event]:
    station = state.station(station_id)
    if station is None:
        raise CommandRejected(f"no station {station_id!r}")
    if state.estop or station.order_id is None:
        return []  # a pulse while nothing runs: nothing was built
    item = state.work_items[station.order_id]
    built: list[ev.Event] = [ev.UnitBuilt(item.order_id, station_id)]
    if item.units_done + 1 >= item.qty:
        built.append(ev.BuildComplete(item.order_id, station_id))
    return built
