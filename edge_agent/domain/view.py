"""The state as users see it: the JSON of `status --json`, `log replay --json`
and the retained MQTT `state` topic (the README's "MQTT contract")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from edge_agent.domain.state import State, WorkItem


def state_view(state: State, now: datetime | None = None) -> dict[str, Any]:
    """Live work items, stations, lane, e-stop and log position; durations
    measured up to `now` (by default the time of the last event: "as of")."""
    if now is None:
        now = datetime.fromisoformat(state.last_ts) if state.last_ts else datetime.fromtimestamp(0, UTC)
    return {
        "last_seq": state.last_seq,
        "as_of": state.last_ts,
        "estop": state.estop,
        "inventory_seq": state.inventory_seq,
        "stations": [{"id": s.id, "state": s.state, "order_id": s.order_id} for s in state.stations],
        "lane": {"state": state.lane.state, "order_id": state.lane.order_id, "queue": list(state.lane.queue)},
        "work_items": [
            _item_view(item, now) for item in sorted(state.work_items.values(), key=lambda i: i.accepted_seq)
        ],
    }


def _item_view(item: WorkItem, now: datetime) -> dict[str, Any]:
    return {
        "order_id": item.order_id,
        "product_id": item.product_id,
        "qty": item.qty,
        "warehouse": item.warehouse,
        "priority": item.priority,
        "stage": str(item.stage),
        "station": item.station,
        "station_stage": None if item.station_stage is None else str(item.station_stage),
        "progress": item.progress,
        "units_done": item.units_done,
        "wait_s": item.wait_s(now),
        "build_s": item.build_s(now),
        "inventory_id": item.inventory_id,
        "reason": item.reason,
    }
