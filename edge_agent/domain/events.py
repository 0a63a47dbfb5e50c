"""The facts the agent records: one frozen type per kind of event.

Every state change of the cell is one of these, appended to the log before it
takes effect. The class name is the event's `type` in the log and on MQTT, so
renaming a class or a field is a breaking change of the contract.

Payloads are versioned. A type whose fields change gets the next version as its
msgspec tag (`tag_field="_v", tag=N`), and `upcast.py` an upcaster from the
version before; the fold only ever sees the current shape. Version 1 carries no
tag: every row written before versions existed keeps its bytes, and so its hash.
"""

from __future__ import annotations

import msgspec

from edge_agent.cell import ESTOP
from edge_agent.domain.state import Frozen, Policy

# The key of the payload version in an event's stored JSON, present only from version 2 on.
# Inside `data`, not a column of its own: a row written before versions existed (all of
# them version 1) is hashed over exactly the bytes it always was, the MQTT `events`
# message keeps its keys, and an archive or export carries the version with the payload.
PAYLOAD_VERSION = "_v"


def payload_version(cls: type[msgspec.Struct]) -> int:
    """The payload version this release writes for an event type (1: no tag)."""
    tag = cls.__struct_config__.tag
    return tag if isinstance(tag, int) else 1


class _Fact(Frozen, frozen=True, forbid_unknown_fields=True):
    """An event: decoded straight from the log's JSON, which must hold its fields and no others."""


class _OrderEvent(_Fact, frozen=True):
    """An event about one work item; the order id is its subject."""

    order_id: str

    @property
    def subject(self) -> str:
        return self.order_id


class OrderAccepted(_OrderEvent, frozen=True):
    """A valid order became a work item (stage `New`)."""

    product_id: str
    qty: int
    warehouse: str
    priority: int
    digest: str  # of the order body: tells a redelivery from a conflicting duplicate


class OrderQueued(_OrderEvent, frozen=True):
    """Validated; waiting for a station (stage `FactoryReady`)."""


class StationAssigned(_OrderEvent, frozen=True):
    """A station started building the item (stage `FactoryAccepted`)."""

    station: str


class UnitBuilt(_OrderEvent, frozen=True):
    """The station reported one finished unit of the item."""

    station: str


class BuildComplete(_OrderEvent, frozen=True):
    """All units are built (stage `FactoryComplete`); the batch waits to ship."""

    station: str


class ShipmentStarted(_OrderEvent, frozen=True):
    """The batch is on the shipping lane (stage `MoveToWarehouse`)."""


class ShipmentArrived(_OrderEvent, frozen=True):
    """The batch reached the warehouse; the lane is free."""


class InventoryIssued(_OrderEvent, frozen=True):
    """The next inventory id was given to the batch (stage `InventoryAvailable`). It carries
    the whole inventory record, so the record can be published from this event alone."""

    inventory_id: str
    product_id: str
    qty: int
    warehouse: str


class TidiedUp(_OrderEvent, frozen=True):
    """A finished item left the live state; it stays in the log."""


class OrderFailed(_OrderEvent, frozen=True):
    """The item cannot be completed (stage `Failed`); `reason` says why."""

    reason: str


class OrderCancelled(_OrderEvent, frozen=True):
    """The item was cancelled before it was complete (stage `Cancelled`)."""


class StepCompleted(_OrderEvent, frozen=True, tag_field=PAYLOAD_VERSION, tag=2):
    """The item's workflow finished step number `step`, called `name`, of the step list
    `workflow` (its version: an item finishes under the step list it started with).
    Version 2; version 1 had no `workflow` (always 1 then)."""

    step: int
    name: str
    workflow: int = 1


class TimerArmed(_OrderEvent, frozen=True):
    """A durable timeout (`unit` or `transit`) runs until `deadline` (UTC)."""

    timer: str
    deadline: str


class RetryScheduled(_OrderEvent, frozen=True):
    """A timeout or fault: the output stays off until `resume_at`, then the
    step is tried again (attempt number `attempt`)."""

    attempt: int
    reason: str
    resume_at: str


class OrderRejected(_Fact, frozen=True):
    """An inbound order was refused; no work item exists for it."""

    order_id: str | None  # None when the payload was unreadable
    reason: str

    @property
    def subject(self) -> str:
        return self.order_id or ""


class PlantConfigured(_Fact, frozen=True):
    """What the device profile provides: stations, products with their largest
    quantity, and the timeout and retry policy (logged when any of it changes)."""

    stations: tuple[str, ...]
    products: tuple[tuple[str, int], ...] = ()
    policy: Policy = msgspec.field(default_factory=Policy)

    @property
    def subject(self) -> str:
        return "plant"


class AgentStarted(_Fact, frozen=True):
    """The agent started: every output was turned off, then the log recovered."""

    version: str
    profile: str

    @property
    def subject(self) -> str:
        return "agent"


class AgentStopped(_Fact, frozen=True):
    """The agent stopped in order: every output is off."""

    reason: str

    @property
    def subject(self) -> str:
        return "agent"


class EstopEngaged(_Fact, frozen=True):
    """The emergency stop became active: every output is off."""

    @property
    def subject(self) -> str:
        return ESTOP  # named after the input


class EstopReleased(_Fact, frozen=True):
    """The emergency stop was released: work resumes where it was."""

    @property
    def subject(self) -> str:
        return ESTOP  # named after the input


Event = (
    PlantConfigured
    | OrderAccepted
    | OrderRejected
    | OrderQueued
    | StationAssigned
    | UnitBuilt
    | BuildComplete
    | ShipmentStarted
    | ShipmentArrived
    | InventoryIssued
    | TidiedUp
    | OrderFailed
    | OrderCancelled
    | StepCompleted
    | TimerArmed
    | RetryScheduled
    | AgentStarted
    | AgentStopped
    | EstopEngaged
    | EstopReleased
)

EVENT_TYPES: dict[str, type[Event]] = {cls.__name__: cls for cls in Event.__args__}


class Recorded(_Fact, frozen=True):
    """An event as the log holds it: its position and its commit time."""

    seq: int
    ts: str  # UTC, ISO 8601
    event: Event
