"""The live state of the cell: what the fold of the log gives.

Frozen values only. The collections are `immutables.Map`s (hash array mapped
tries) so that one event costs O(log n) instead of a copy of every order the
device has seen, and a replay can batch changes through a transient mutation.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import msgspec
from immutables import Map


class Stage(StrEnum):
    """Stages of a work item, in the order an item passes them (or ends in Failed or Cancelled)."""

    NEW = "New"
    FACTORY_READY = "FactoryReady"
    FACTORY_ACCEPTED = "FactoryAccepted"
    FACTORY_COMPLETE = "FactoryComplete"
    MOVE_TO_WAREHOUSE = "MoveToWarehouse"
    INVENTORY_AVAILABLE = "InventoryAvailable"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


# Stages after which nothing more happens to the item but its tidy-up.
FINISHED_STAGES = frozenset({Stage.INVENTORY_AVAILABLE, Stage.FAILED, Stage.CANCELLED})
# Stages in which an item may still be cancelled (not yet FactoryComplete).
CANCELLABLE_STAGES = frozenset({Stage.NEW, Stage.FACTORY_READY, Stage.FACTORY_ACCEPTED})


class StationStage(StrEnum):
    """Where an item stands with respect to the production stations."""

    WAITING = "Waiting"
    BUILDING = "Building"
    COMPLETE = "Complete"


class Frozen(msgspec.Struct, frozen=True, gc=False):
    """A frozen record. A msgspec Struct rather than a dataclass: a fold builds a state and
    an item per item it changed, and a Struct is about ten times cheaper to build; it
    holds no cycles, so the garbage collector need not track it."""


class Policy(Frozen, frozen=True):
    """Timeouts and retries of the cell (from the device profile, scaled by speed)."""

    unit_timeout_s: float = 30.0
    transit_timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    # Stations whose `fault` input is retried like a timeout (with backoff, up to
    # `retries`) instead of failing the item at once. (A log from before this field
    # holds `on_fault: "fail"` instead, which meant the same as none listed here.)
    fault_retried: tuple[str, ...] = ()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (1, 2, ...): doubling, capped."""
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** (attempt - 1))


class WorkItem(Frozen, frozen=True):
    """One accepted order on its way through the cell."""

    order_id: str
    product_id: str
    qty: int
    warehouse: str
    priority: int
    accepted_seq: int  # the age used to break priority ties: lower is older
    accepted_at: str
    stage: Stage = Stage.NEW
    station: str | None = None
    station_stage: StationStage | None = None
    units_done: int = 0
    queued_at: str | None = None
    build_started_at: str | None = None
    build_finished_at: str | None = None
    inventory_id: str | None = None
    reason: str | None = None
    steps_done: tuple[str, ...] = ()  # names of the workflow steps completed, in order
    timer: str | None = None  # the running timeout: "unit" or "transit"
    deadline: str | None = None  # when it runs out (UTC); None while paused or idle
    attempt: int = 0  # retries used in the current stage
    paused_until: str | None = None  # output held off until then, before a retry
    # The version of the step list the item follows, from its first completed step on
    # (None before: it takes the current one). Items started under an older step list
    # finish under it.
    workflow: int | None = None

    @property
    def progress(self) -> int:
        """Percentage of units built, 0..100."""
        return self.units_done * 100 // self.qty

    def wait_s(self, now: datetime) -> float | None:
        """Seconds spent waiting for a station (so far, if still waiting)."""
        return _span(self.queued_at, self.build_started_at, now)

    def build_s(self, now: datetime) -> float | None:
        """Seconds spent building (so far, if still building)."""
        return _span(self.build_started_at, self.build_finished_at, now)


def _span(start: str | None, end: str | None, now: datetime) -> float | None:
    if start is None:
        return None
    finish = datetime.fromisoformat(end) if end is not None else now
    return max(0.0, (finish - datetime.fromisoformat(start)).total_seconds())


class Station(Frozen, frozen=True):
    """A production station; builds one work item at a time."""

    id: str
    order_id: str | None = None

    @property
    def state(self) -> str:
        return "idle" if self.order_id is None else "building"


class Lane(Frozen, frozen=True):
    """The shipping lane: one batch moving at a time, the rest queued FIFO."""

    order_id: str | None = None
    queue: tuple[str, ...] = ()

    @property
    def state(self) -> str:
        return "idle" if self.order_id is None else "moving"


class State(Frozen, frozen=True):
    """Everything the agent knows, as of log position `last_seq`."""

    last_seq: int = 0
    last_ts: str | None = None  # when event `last_seq` was logged: the state is as of then
    estop: bool = False
    inventory_seq: int = 0
    estop_since: str | None = None  # timers are frozen from then until the release
    stations: tuple[Station, ...] = ()
    products: Map[str, int] = msgspec.field(default_factory=Map)  # product_id -> largest qty
    policy: Policy = Policy()
    lane: Lane = Lane()
    work_items: Map[str, WorkItem] = msgspec.field(default_factory=Map)
    # Orders accepted, ever. Which ids they had (the idempotency record) is kept beside the
    # log in an indexed table, not here: the state, and so every snapshot, follows the live
    # items, not the history.
    accepted: int = 0
    rejected: int = 0  # orders rejected, ever

    def station(self, station_id: str) -> Station | None:
        return next((s for s in self.stations if s.id == station_id), None)


def inventory_id(number: int) -> str:
    """The inventory id for the n-th batch of this device: INV00001, ..."""
    return f"INV{number:05d}"
