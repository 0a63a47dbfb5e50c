"""What the agent can be asked to do; `decide` turns these into events."""

from __future__ import annotations

from dataclasses import dataclass


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
    """The stations the device profile provides."""

    stations: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QueueOrder:
    """The item passed its checks; let it wait for a station."""

    order_id: str


@dataclass(frozen=True, slots=True)
class AssignStations:
    """Give every idle station the best waiting item (priority, then age)."""


@dataclass(frozen=True, slots=True)
class RecordUnit:
    """A station's `unit_done` input fired."""

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
    | StartShipment
    | RecordArrival
    | FailOrder
    | CancelOrder
    | TidyUp
    | EngageEstop
    | ReleaseEstop
)
