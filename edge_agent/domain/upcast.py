"""Stored shapes of older releases, brought up to the current ones: the only place that knows them.

Every stored format says which version wrote it: an event's payload (its `_v`
key, absent for version 1: see `events.py`) and a snapshot (its `format` key,
absent for format 1). An upcaster takes one version to the next, as
pyeventsourcing's `upcast_vN_vN+1`; reading applies them in turn, so the fold and
the rest of the code only ever see the current shapes. A release that changes a
shape adds the next version and its upcaster here, and never edits an older
one: golden logs of every release (`tests/golden/`) are read by every later one.

Pure: dicts in, dicts out. A version newer than this release knows is refused
with NewerLog (nothing is guessed about a future shape).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edge_agent.domain import events as ev
from edge_agent.errors import NewerLog

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

SNAPSHOT_FORMAT_KEY = "format"

# -- events -------------------------------------------------------------------


def _step_completed_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Steps logged before items recorded their workflow's version: there was only version 1."""
    return {**data, "workflow": 1}


# Per event type, the upcasters from version 1 on: index i takes version i + 1 to i + 2.
EVENT_UPCASTERS: dict[str, tuple[Upcaster, ...]] = {
    ev.StepCompleted.__name__: (_step_completed_v1_v2,),
}

# The payload version this release writes for each event type.
EVENT_VERSIONS: dict[str, int] = {name: ev.payload_version(cls) for name, cls in ev.EVENT_TYPES.items()}

for _name, _version in EVENT_VERSIONS.items():  # a version without its upcasters would be unreadable
    assert len(EVENT_UPCASTERS.get(_name, ())) == _version - 1, f"{_name}: upcasters do not reach version {_version}"


def upcast_event(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The payload `data` of an event of type `type_name`, in this release's shape
    (without its version key)."""
    data = dict(data)
    version = data.pop(ev.PAYLOAD_VERSION, 1)
    current = EVENT_VERSIONS[type_name]
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{type_name} has the payload version {version!r}")
    if version > current:
        raise NewerLog(
            f"{type_name} payload version {version} was written by a newer release (this one reads up to {current})"
        )
    for upcaster in EVENT_UPCASTERS.get(type_name, ())[version - 1 :]:
        data = upcaster(data)
    return data


# -- snapshots ----------------------------------------------------------------

# A work item's fields in format 1, stored by position in this order (release 0.1.0).
_ITEM_FIELDS_V1 = (
    "order_id",
    "product_id",
    "qty",
    "warehouse",
    "priority",
    "accepted_seq",
    "accepted_at",
    "stage",
    "station",
    "station_stage",
    "units_done",
    "queued_at",
    "build_started_at",
    "build_finished_at",
    "inventory_id",
    "reason",
    "steps_done",
    "timer",
    "deadline",
    "attempt",
    "paused_until",
)


def _snapshot_v1_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 names the items' fields (`item_fields`) instead of relying on the code's
    field order, and items say their workflow version (1 for any that has begun: the
    only one then). Older format-1 snapshots held every accepted order's id (`orders`)
    instead of their count, and a `policy.on_fault` that meant no station retried."""
    steps = _ITEM_FIELDS_V1.index("steps_done")
    upcast = {key: value for key, value in data.items() if key != "orders"}
    upcast["accepted"] = data["accepted"] if "accepted" in data else len(data["orders"])
    upcast["policy"] = {key: value for key, value in data["policy"].items() if key != "on_fault"}
    upcast["item_fields"] = [*_ITEM_FIELDS_V1, "workflow"]
    upcast["work_items"] = [[*row, 1 if row[steps] else None] for row in data["work_items"]]
    upcast[SNAPSHOT_FORMAT_KEY] = 2
    return upcast


# Index i takes format i + 1 to i + 2.
SNAPSHOT_UPCASTERS: tuple[Upcaster, ...] = (_snapshot_v1_v2,)
SNAPSHOT_FORMAT = len(SNAPSHOT_UPCASTERS) + 1  # the format this release writes


def upcast_snapshot(data: dict[str, Any]) -> dict[str, Any]:
    """A stored snapshot's dict in the current format."""
    version = data.get(SNAPSHOT_FORMAT_KEY, 1)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"snapshot format {version!r}")
    if version > SNAPSHOT_FORMAT:
        raise NewerLog(
            f"snapshot format {version} was written by a newer release (this one reads up to {SNAPSHOT_FORMAT})"
        )
    for upcaster in SNAPSHOT_UPCASTERS[version - 1 :]:
        data = upcaster(data)
    return data
