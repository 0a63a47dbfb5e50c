"""evolve(state, event) -> state: how each recorded event changes the state.

Replay is a fold of these. The fold works on a transient draft (mutable maps,
and the items it touches as plain dicts, all frozen once at the end), so folding
a million events costs one pass, not a copy of the state or of an item per
event; evolve is the fold of a single event.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, assert_never

import msgspec
from immutables import Map

from edge_agent.domain import events as ev
from edge_agent.domain.moments import later, seconds_between
from edge_agent.domain.state import Lane, Stage, State, Station, StationStage, WorkItem
from edge_agent.errors import InvalidEvent

# Every field in order, the required ones None until set: `flush` builds items positionally.
_ITEM_DEFAULTS = {
    f.name: None if f.default is msgspec.NODEFAULT else f.default for f in msgspec.structs.fields(WorkItem)
}


class _Draft:
    """A mutable working copy of the state, used only inside `fold`."""

    __slots__ = (
        "accepted",
        "dirty",
        "estop",
        "estop_since",
        "inventory_seq",
        "items",
        "last_seq",
        "last_ts",
        "policy",
        "products",
        "queue",
        "rejected",
        "shipping",
        "stations",
    )

    def __init__(self, state: State) -> None:
        self.last_seq = state.last_seq
        self.last_ts = state.last_ts
        self.estop = state.estop
        self.estop_since = state.estop_since
        self.inventory_seq = state.inventory_seq
        self.products = state.products
        self.policy = state.policy
        self.rejected = state.rejected
        self.stations: dict[str, str | None] = {s.id: s.order_id for s in state.stations}
        self.shipping = state.lane.order_id
        self.queue = list(state.lane.queue)
        self.items = state.work_items.mutate()
        self.dirty: dict[str, dict[str, Any]] = {}  # items changed in this fold, as mutable fields
        self.accepted = state.accepted

    def freeze(self) -> State:
        self.flush()
        return State(
            last_seq=self.last_seq,
            last_ts=self.last_ts,
            estop=self.estop,
            estop_since=self.estop_since,
            inventory_seq=self.inventory_seq,
            stations=tuple(Station(sid, oid) for sid, oid in self.stations.items()),
            products=self.products,
            policy=self.policy,
            lane=Lane(self.shipping, tuple(self.queue)),
            work_items=self.items.finish(),
            accepted=self.accepted,
            rejected=self.rejected,
        )

    def item(self, order_id: str) -> dict[str, Any]:
        """The item's fields, to read and change in place (frozen again at `flush`)."""
        changed = self.dirty.get(order_id)
        if changed is None:
            item = self.items[order_id]
            changed = self.dirty[order_id] = msgspec.structs.asdict(item)
        return changed

    def remove(self, order_id: str) -> None:
        if self.dirty.pop(order_id, None) is None or order_id in self.items:
            del self.items[order_id]

    def flush(self) -> None:
        """Freeze the items changed so far."""
        for order_id, changed in self.dirty.items():
            self.items[order_id] = WorkItem(*changed.values())  # the dicts keep the fields' order
        self.dirty.clear()

    def snapshot_items(self) -> Map[str, WorkItem]:
        """The items as they are now (a mutation cannot be iterated; its result can)."""
        self.flush()
        items = self.items.finish()
        self.items = items.mutate()
        return items

    def stop_timer(self, order_id: str) -> dict[str, Any]:
        """The item, its timer stopped."""
        item = self.item(order_id)
        item["timer"] = item["deadline"] = item["paused_until"] = None
        return item

    def release(self, order_id: str) -> None:
        """Take the item off its station and the lane, wherever it is."""
        station = self.item(order_id)["station"]
        if station is not None and self.stations.get(station) == order_id:
            self.stations[station] = None
        if self.shipping == order_id:
            self.shipping = None
        if order_id in self.queue:
            self.queue.remove(order_id)


def _plant_configured(d: _Draft, e: ev.PlantConfigured, r: ev.Recorded) -> None:
    d.stations = {sid: d.stations.get(sid) for sid in e.stations}
    d.products = Map(dict(e.products))
    d.policy = e.policy


def _accepted(d: _Draft, e: ev.OrderAccepted, r: ev.Recorded) -> None:
    item = d.dirty[e.order_id] = dict(_ITEM_DEFAULTS)
    item["order_id"] = e.order_id
    item["product_id"] = e.product_id
    item["qty"] = e.qty
    item["warehouse"] = e.warehouse
    item["priority"] = e.priority
    item["accepted_seq"] = r.seq
    item["accepted_at"] = r.ts
    d.accepted += 1


def _rejected(d: _Draft, e: ev.OrderRejected, r: ev.Recorded) -> None:
    d.rejected += 1


def _queued(d: _Draft, e: ev.OrderQueued, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    item["stage"] = Stage.FACTORY_READY
    item["station_stage"] = StationStage.WAITING
    item["queued_at"] = r.ts


def _assigned(d: _Draft, e: ev.StationAssigned, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    item["stage"] = Stage.FACTORY_ACCEPTED
    item["station"] = e.station
    item["station_stage"] = StationStage.BUILDING
    item["build_started_at"] = r.ts
    d.stations[e.station] = e.order_id


def _unit_built(d: _Draft, e: ev.UnitBuilt, r: ev.Recorded) -> None:
    d.item(e.order_id)["units_done"] += 1


def _build_complete(d: _Draft, e: ev.BuildComplete, r: ev.Recorded) -> None:
    item = d.stop_timer(e.order_id)
    item["attempt"] = 0
    item["stage"] = Stage.FACTORY_COMPLETE
    item["station_stage"] = StationStage.COMPLETE
    item["build_finished_at"] = r.ts
    d.stations[e.station] = None
    d.queue.append(e.order_id)


def _shipment_started(d: _Draft, e: ev.ShipmentStarted, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    item["stage"] = Stage.MOVE_TO_WAREHOUSE
    item["attempt"] = 0
    d.queue.remove(e.order_id)
    d.shipping = e.order_id


def _shipment_arrived(d: _Draft, e: ev.ShipmentArrived, r: ev.Recorded) -> None:
    d.shipping = None
    d.stop_timer(e.order_id)


def _inventory_issued(d: _Draft, e: ev.InventoryIssued, r: ev.Recorded) -> None:
    d.inventory_seq += 1
    item = d.item(e.order_id)
    item["stage"] = Stage.INVENTORY_AVAILABLE
    item["inventory_id"] = e.inventory_id


def _tidied_up(d: _Draft, e: ev.TidiedUp, r: ev.Recorded) -> None:
    d.remove(e.order_id)


def _failed(d: _Draft, e: ev.OrderFailed, r: ev.Recorded) -> None:
    d.release(e.order_id)
    item = d.stop_timer(e.order_id)
    item["stage"] = Stage.FAILED
    item["reason"] = e.reason


def _cancelled(d: _Draft, e: ev.OrderCancelled, r: ev.Recorded) -> None:
    d.release(e.order_id)
    d.stop_timer(e.order_id)["stage"] = Stage.CANCELLED


def _step_completed(d: _Draft, e: ev.StepCompleted, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    done = item["steps_done"]
    if e.step != len(done):
        raise ValueError(f"step {e.step} ({e.name}) completed after {len(done)} steps")
    item["steps_done"] = (*done, e.name)
    item["workflow"] = e.workflow


def _timer_armed(d: _Draft, e: ev.TimerArmed, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    item["timer"] = e.timer
    item["deadline"] = e.deadline
    item["paused_until"] = None


def _retry_scheduled(d: _Draft, e: ev.RetryScheduled, r: ev.Recorded) -> None:
    item = d.item(e.order_id)
    item["attempt"] = e.attempt
    item["deadline"] = None
    item["paused_until"] = e.resume_at


def _for_the_record(d: _Draft, e: ev.AgentStarted | ev.AgentStopped, r: ev.Recorded) -> None:
    """Starts and stops are facts for the record; they change no state."""


def _estop_engaged(d: _Draft, e: ev.EstopEngaged, r: ev.Recorded) -> None:
    d.estop = True
    d.estop_since = r.ts


def _estop_released(d: _Draft, e: ev.EstopReleased, r: ev.Recorded) -> None:
    # Timers were frozen while the e-stop was active: move every deadline on by that long.
    frozen_s = seconds_between(d.estop_since, r.ts) if d.estop_since else 0.0
    for item in [i for i in d.snapshot_items().values() if i.deadline or i.paused_until]:
        changed = d.item(item.order_id)
        changed["deadline"] = item.deadline and later(item.deadline, frozen_s)
        changed["paused_until"] = item.paused_until and later(item.paused_until, frozen_s)
    d.estop = False
    d.estop_since = None


_Handler = Callable[[_Draft, Any, ev.Recorded], None]


def _handler(e: ev.Event) -> _Handler:
    """The function that folds events of `e`'s type. A `match`, so that mypy names any
    event type left unhandled; `fold` asks once per type and keeps the answer in
    `_HANDLERS`, because a table lookup per event replays twice as fast as a match."""
    match e:
        case ev.PlantConfigured():
            return _plant_configured
        case ev.OrderAccepted():
            return _accepted
        case ev.OrderRejected():
            return _rejected
        case ev.OrderQueued():
            return _queued
        case ev.StationAssigned():
            return _assigned
        case ev.UnitBuilt():
            return _unit_built
        case ev.BuildComplete():
            return _build_complete
        case ev.ShipmentStarted():
            return _shipment_started
        case ev.ShipmentArrived():
            return _shipment_arrived
        case ev.InventoryIssued():
            return _inventory_issued
        case ev.TidiedUp():
            return _tidied_up
        case ev.OrderFailed():
            return _failed
        case ev.OrderCancelled():
            return _cancelled
        case ev.StepCompleted():
            return _step_completed
        case ev.TimerArmed():
            return _timer_armed
        case ev.RetryScheduled():
            return _retry_scheduled
        case ev.EstopEngaged():
            return _estop_engaged
        case ev.EstopReleased():
            return _estop_released
        case ev.AgentStarted() | ev.AgentStopped():
            return _for_the_record
        case _:
            assert_never(e)


_HANDLERS: dict[type[ev.Event], _Handler] = {}  # filled by `fold` as it meets each type


def fold(state: State, records: Iterable[ev.Recorded]) -> State:
    """Apply recorded events, in seq order, to `state`."""
    draft = _Draft(state)
    last = draft.last_seq  # kept in locals: this loop runs once per event of a replay
    handlers = _HANDLERS
    record = None
    with _collector_paused():
        for record in records:
            last += 1
            if record.seq != last:
                raise InvalidEvent(record.seq, f"expected seq {last}")
            event = record.event
            try:
                handler = handlers[type(event)]
            except KeyError:  # the first of its type
                handler = handlers[type(event)] = _handler(event)
            try:
                handler(draft, event, record)
            except (KeyError, ValueError) as error:
                raise InvalidEvent(last, f"{type(event).__name__} does not fit the state ({error!r})") from error
    if record is not None:
        draft.last_ts = record.ts
    draft.last_seq = last
    return draft.freeze()


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block. A replay makes millions of
    small objects (rows, events, dicts), none of them in a cycle; the collector would
    scan them again every few hundred allocations (a sixth of a replay's time) and
    free nothing. Whatever cycles other code makes meanwhile are collected after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def evolve(state: State, record: ev.Recorded) -> State:
    """The state after one recorded event."""
    return fold(state, (record,))
