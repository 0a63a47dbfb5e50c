"""What the agent can be asked to do; `decide` turns these into events."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson

from edge_agent.domain.state import Policy


def order_digest(order_id: str, product_id: str, qty: int, warehouse: str, priority: int) -> str:
    """The idempotency digest of an order's body: the same order, from whatever origin and
    however its JSON was laid out, has the same digest (sha256 of its fields as JSON with
    sorted keys; the format of every digest already in a log)."""
    body = {"order_id": order_id, "product_id": product_id, "qty": qty, "warehouse": warehouse, "priority": priority}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class SubmitOrder:
    """A validated inbound order."""

    order_id: str
    product_id: str
    qty: int
    warehouse: str
    priority: int
    digest: str


@dataclass(frozen=True, slots=True)
class RejectOrder:
    """An inbound order that failed validation."""

    order_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ConfigurePlant:
    """What the device profile provides: stations, products (id, largest qty), policy."""

    stations: tuple[str, ...]
    products: tuple[tuple[str, int], ...] = ()
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True, slots=True)
class QueueOrder:
    """Check the item against what the plant makes; if it can be made, let it wait for a station."""

    order_id: str


@dataclass(frozen=True, slots=True)
class AssignStations:
    """Give every idle station the best waiting item (priority, then age)."""


@dataclass(frozen=True, slots=True)
class RecordUnit:
    """A station's `unit_done` input fired."""

    station: str


@dataclass(frozen=True, slots=True)
class RecordFault:
    """A station's `fault` input fired."""

    station: str


@dataclass(frozen=True, slots=True)
class StartShipment:
    """Put the next completed batch on the idle shipping lane."""


@dataclass(frozen=True, slots=True)
class RecordArrival:
    """The shipping lane's `arrived` input fired."""


@dataclass(frozen=True, slots=True)
class FailOrder:
    order_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class CancelOrder:
    order_id: str


@dataclass(frozen=True, slots=True)
class TidyUp:
    order_id: str


@dataclass(frozen=True, slots=True)
class CompleteStep:
    """The item's current workflow step, `name`, is done."""

    order_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Tick:
    """These items' timeouts or retry pauses have run out (measured in-process on a
    monotonic clock, so the wall clock jumping cannot fire or hold back a timeout)."""

    due: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RearmTimers:
    """After a restart: every running timeout starts afresh (the outputs were off meanwhile)."""


@dataclass(frozen=True, slots=True)
class RecordStart:
    version: str
    profile: str


@dataclass(frozen=True, slots=True)
class RecordStop:
    reason: str


@dataclass(frozen=True, slots=True)
class EngageEstop:
    pass


@dataclass(frozen=True, slots=True)
class ReleaseEstop:
    pass


Command = (
    SubmitOrder
    | RejectOrder
    | ConfigurePlant
    | QueueOrder
    | AssignStations
    | RecordUnit
    | RecordFault
    | StartShipment
    | RecordArrival
    | FailOrder
    | CancelOrder
    | TidyUp
    | CompleteStep
    | Tick
    | RearmTimers
    | RecordStart
    | RecordStop
    | EngageEstop
    | ReleaseEstop
)
