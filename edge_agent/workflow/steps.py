"""The durable workflow of one work item, step by step.

    validate -> send_to_factory -> wait_factory_complete -> move_to_warehouse
             -> publish_inventory -> tidy_up

Each step is done when a condition on the item holds; some steps act to get
there (validate queues the order, tidy_up removes it). Completing a step is an
event in the log (`StepCompleted`, numbered and named), so after a restart each
item resumes at its step and a step logged as done never runs again. The
waiting in between — for a station, for units, for the lane, for time — is the
cell's business, driven by inputs, the scheduler and durable timers.

Step lists are versioned. A release that changes the steps adds a new version to
`WORKFLOWS` and keeps the older ones: an item records the version it follows
with its first completed step (`StepCompleted.workflow`), so items started under
an older list finish under it, after any upgrade.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.domain import commands as cmd
from edge_agent.domain.state import Stage, WorkItem

_IN_FACTORY = frozenset({Stage.FACTORY_ACCEPTED, Stage.FACTORY_COMPLETE, Stage.MOVE_TO_WAREHOUSE})
_BUILT = frozenset({Stage.FACTORY_COMPLETE, Stage.MOVE_TO_WAREHOUSE, Stage.INVENTORY_AVAILABLE})


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    done: Callable[[WorkItem], bool]  # the step is complete once this holds
    act: Callable[[WorkItem], cmd.Command] | None = None  # what the step does to get there
    removes_item: bool = False  # completing it takes the item out of the live state


_V1: tuple[Step, ...] = (
    Step("validate", lambda i: i.stage is not Stage.NEW, lambda i: cmd.QueueOrder(i.order_id)),
    Step("send_to_factory", lambda i: i.stage in _IN_FACTORY or i.stage is Stage.INVENTORY_AVAILABLE),
    Step("wait_factory_complete", lambda i: i.stage in _BUILT),
    Step("move_to_warehouse", lambda i: i.stage is Stage.INVENTORY_AVAILABLE),
    # The inventory record goes out from the log itself (the log is the outbox):
    # once InventoryIssued is committed, its publication cannot be lost.
    Step("publish_inventory", lambda i: i.inventory_id is not None),
    Step("tidy_up", lambda i: True, removes_item=True),
)

# Every step list a release has shipped, by version; never change or remove one.
WORKFLOWS: dict[int, tuple[Step, ...]] = {1: _V1}
WORKFLOW_VERSION = max(WORKFLOWS)  # what new items follow
STEPS = WORKFLOWS[WORKFLOW_VERSION]
STEP_NAMES = tuple(step.name for step in STEPS)


def steps_of(item: WorkItem) -> tuple[Step, ...] | None:
    """The step list `item` follows (None: a version this release does not know)."""
    return WORKFLOWS.get(item.workflow if item.workflow is not None else WORKFLOW_VERSION)
