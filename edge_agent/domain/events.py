"""The facts the agent records: one frozen type per kind of event.

Every state change of the cell is one of these, appended to the log before it
takes effect. The class name is the event's `type` in the log and on MQTT, so
renaming a class or a field is a breaking change of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_agent.domain.state import Policy


@dataclass(frozen=True, slots=True)
class _OrderEvent:
    """An event about one work item; the order id is its subject."""

    order_id: str

    @property
    def subject(self) -> str:
        return self.order_id


@dataclass(frozen=True, slots=True)
class OrderAccepted(_OrderEvent):
    """A valid order became a work item (stage `New`)."""

    product_id: str
    qty: int
    warehouse: str
    priority: int
    digest: str  # of the order body: tells a redelivery from a conflicting duplicate


@dataclass(frozen=True, slots=True)
class OrderQueued(_OrderEvent):
    """Validated; waiting for a station (stage `FactoryReady`)."""


@dataclass(frozen=True, slots=True)
class StationAssigned(_OrderEvent):
    """A station started building the item (stage `FactoryAccepted`)."""

    station: str


@dataclass(frozen=True, slots=True)
class UnitBuilt(_OrderEvent):
    """The station reported one finished unit of the item."""

    station: str


@dataclass(frozen=True, slots=True)
class BuildComplete(_OrderEvent):
    """All units are built (stage `FactoryComplete`); the batch waits to ship."""

    station: str


@dataclass(frozen=True, slots=True)
class ShipmentStarted(_OrderEvent):
    """The batch is on the shipping lane (stage `MoveToWarehouse`)."""


@dataclass(frozen=True, slots=True)
class ShipmentArrived(_OrderEvent):
    """The batch reached the warehouse; the lane is free."""


@dataclass(frozen=True, slots=True)
class InventoryIssued(_OrderEvent):
    """The next inventory id was given to the batch (stage `InventoryAvailable`). It carries
    the whole inventory record, so the record can be published from this event alone."""

    inventory_id: str
    product_id: str
    qty: int
    warehouse: str


@dataclass(frozen=True, slots=True)
class TidiedUp(_OrderEvent):
    """A finished item left the live state; it stays in the log."""


@dataclass(frozen=True, slots=True)
class OrderFailed(_OrderEvent):
    """The item cannot be completed (stage `Failed`); `reason` says why."""

    reason: str


@dataclass(frozen=True, slots=True)
class OrderCancelled(_OrderEvent):
    """The item was cancelled before it was complete (stage `Cancelled`)."""


@dataclass(frozen=True, slots=True)
class StepCompleted(_OrderEvent):
    """The item's workflow finished step number `step`, called `name`."""

    step: int
    name: str


@dataclass(frozen=True, slots=True)
class TimerArmed(_OrderEvent):
    """A durable timeout (`unit` or `transit`) runs until `deadline` (UTC)."""

    timer: str
    deadline: str


@dataclass(frozen=True, slots=True)
class RetryScheduled(_OrderEvent):
    """A timeout or fault: the output stays off until `resume_at`, then the
    step is tried again (attempt number `attempt`)."""

    attempt: int
    reason: str
    resume_at: str


@dataclass(frozen=True, slots=True)
class OrderRejected:
    """An inbound order was refused; no work item exists for it."""

    order_id: str | None  # None when the payload was unreadable
    reason: str

    @property
    def subject(self) -> str:
        return self.order_id or ""


@dataclass(frozen=True, slots=True)
class PlantConfigured:
    """What the device profile provides: stations, products with their largest
    quantity, and the timeout and retry policy (logged when any of it changes)."""

    stations: tuple[str, ...]
    products: tuple[tuple[str, int], ...] = ()
    policy: Policy = field(default_factory=Policy)

    @property
    def subject(self) -> str:
        return "plant"


@dataclass(frozen=True, slots=True)
class AgentStarted:
    """The agent started: every output was turned off, then the log recovered."""

    version: str
    profile: str

    @property
    def subject(self) -> str:
        return "agent"


@dataclass(frozen=True, slots=True)
class AgentStopped:
    """The agent stopped in order: every output is off."""

    reason: str

    @property
    def subject(self) -> str:
        return "agent"


@dataclass(frozen=True, slots=True)
class EstopEngaged:
    """The emergency stop became active: every output is off."""

    @property
    def subject(self) -> str:
        return "estop"


@dataclass(frozen=True, slots=True)
class EstopReleased:
    """The emergency stop was released: work resumes where it was."""

    @property
    def subject(self) -> str:
        return "estop"


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


@dataclass(frozen=True, slots=True)
class Recorded:
    """An event as the log holds it: its position and its commit time."""

    seq: int
    ts: str  # UTC, ISO 8601
    event: Event
