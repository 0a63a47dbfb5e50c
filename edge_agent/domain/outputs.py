"""Which outputs should be on: a function of the state alone.

Because outputs follow from the logged state, an output can only come on
after the event that calls for it is committed, and recovery re-drives every
output from the replayed state.
"""

from __future__ import annotations

from edge_agent.cell import CONVEYOR, STATUS_LED, run_output
from edge_agent.domain.state import State


def desired_outputs(state: State) -> dict[str, bool]:
    """Output name -> on? Everything is off while the e-stop is engaged."""
    wanted = {STATUS_LED: not state.estop}
    for station in state.stations:
        item = state.work_items.get(station.order_id) if station.order_id else None
        wanted[run_output(station.id)] = _running(state, item is not None and item.paused_until is None)
    moving = state.work_items.get(state.lane.order_id) if state.lane.order_id else None
    wanted[CONVEYOR] = _running(state, moving is not None and moving.paused_until is None)
    return wanted


def _running(state: State, busy: bool) -> bool:
    return busy and not state.estop
