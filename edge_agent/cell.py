"""The names of the cell's inputs and outputs: the one place they are spelled.

A device is named after what it does in the cell (`s1.run`, `lane.arrived`):
the profile wires each name to a pin, the domain says which outputs should be
on, the agent turns input edges into commands and the simulator drives the
inputs, all by these names. They also appear in the service log and the
profile check. Imports nothing, so every layer may use it.
"""

from __future__ import annotations

from typing import Literal

CONVEYOR = "lane.conveyor"  # output: the shipping lane moves a batch to the warehouse
ARRIVED = "lane.arrived"  # input: the batch reached the warehouse
ESTOP = "estop"  # input, both edges: the emergency stop
STATUS_LED = "status_led"  # output: on while the e-stop is released

UNIT_DONE: Literal["unit_done"] = "unit_done"  # a station's input: one unit finished
FAULT: Literal["fault"] = "fault"  # a station's input: the station reports a fault
StationInput = Literal["unit_done", "fault"]


def run_output(station_id: str) -> str:
    """The station's output that runs it."""
    return f"{station_id}.run"


def station_input(station_id: str, kind: StationInput) -> str:
    return f"{station_id}.{kind}"


def parse_station_input(name: str) -> tuple[str, StationInput] | None:
    """(station id, kind) of a station's input name; None for any other name."""
    station_id, _, kind = name.rpartition(".")
    if not station_id:
        return None
    if kind == UNIT_DONE:
        return station_id, UNIT_DONE
    if kind == FAULT:
        return station_id, FAULT
    return None
