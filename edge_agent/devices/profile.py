"""Device profiles (`device_profiles/*.yaml`): which pins do what, and what the cell makes.

A profile names the logical devices — per station a `run` output, a
`unit_done` input and an optional `fault` input; the shipping lane's
`conveyor` output and `arrived` input; the `estop` input and the `status_led`
output — with BCM pin numbers and polarity, the products with their largest
quantity, the timeouts and retry policy, and for simulated profiles the
machine's timing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.cell import ARRIVED, CONVEYOR, ESTOP, FAULT, STATUS_LED, UNIT_DONE, run_output, station_input
from edge_agent.config import invalid, read_yaml
from edge_agent.errors import ConfigError

PinNumber = int  # BCM numbering


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputPin(_Strict):
    pin: PinNumber = Field(ge=0, le=53)
    active_high: bool = True


class InputPin(_Strict):
    pin: PinNumber = Field(ge=0, le=53)
    # True: internal pull-up, active when pulled to ground; False: pull-down, active high;
    # null: floating (an external circuit drives it), then `active_high` says which level is active.
    pull_up: bool | None = False
    active_high: bool | None = None
    bounce_time: float | None = Field(None, ge=0, le=1)  # seconds; edges closer than this are one edge

    @model_validator(mode="after")
    def _polarity(self) -> InputPin:
        if self.pull_up is None and self.active_high is None:
            raise ValueError("a floating input (pull_up: null) needs active_high: true or false")
        if self.pull_up is not None and self.active_high is not None:
            raise ValueError("active_high is only for floating inputs (pull_up: null); pull_up sets the polarity")
        return self


class BuildHint(_Strict):
    seconds_per_unit: float = Field(gt=0)


class Station(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")
    run: OutputPin
    unit_done: InputPin
    fault: InputPin | None = None
    on_fault: Literal["fail", "retry"] = "fail"  # what a pulse on `fault` does to the item being built
    build: dict[str, BuildHint] = Field(default_factory=dict)  # per product

    @model_validator(mode="after")
    def _retry_needs_a_fault_input(self) -> Station:
        if self.on_fault == "retry" and self.fault is None:
            raise ValueError("on_fault: retry needs a fault input (`fault`) to retry on")
        return self


class Lane(_Strict):
    conveyor: OutputPin
    arrived: InputPin
    transit_s: float = Field(5.0, gt=0)  # how long a batch takes (the simulator's timing)


class Product(_Strict):
    product_id: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_qty: int = Field(ge=1, le=1_000_000)


class Timeouts(_Strict):
    unit_timeout_s: float = Field(30.0, gt=0)
    transit_timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(2, ge=0, le=100)
    backoff_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)


class Profile(_Strict):
    name: str
    pin_factory: Literal["mock", "default"]  # mock: gpiozero's MockFactory plus the simulator
    stations: list[Station] = Field(min_length=1)
    lane: Lane
    estop: InputPin
    status_led: OutputPin | None = None
    products: list[Product] = Field(min_length=1)
    timeouts: Timeouts = Timeouts()
    seconds_per_unit: float = Field(1.0, gt=0)  # the simulator's default build time per unit

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        _no_repeats("station id", [s.id for s in self.stations])
        _no_repeats("product_id", [p.product_id for p in self.products])
        by_pin: dict[int, list[str]] = {}
        for name, pin in self.pins():
            by_pin.setdefault(pin, []).append(name)
        for pin, names in by_pin.items():
            if len(names) > 1:
                raise ValueError(f"pin {pin} is used more than once: {' and '.join(names)}")
        known = {p.product_id for p in self.products}
        for station in self.stations:
            for product_id in station.build:
                if product_id not in known:
                    raise ValueError(f"station {station.id}: build hint for unknown product {product_id!r}")
        return self

    def pins(self) -> list[tuple[str, int]]:
        """Every (device name, BCM pin) the profile uses."""
        used: list[tuple[str, int]] = []
        for s in self.stations:
            used += [(run_output(s.id), s.run.pin), (station_input(s.id, UNIT_DONE), s.unit_done.pin)]
            if s.fault is not None:
                used.append((station_input(s.id, FAULT), s.fault.pin))
        used += [(CONVEYOR, self.lane.conveyor.pin), (ARRIVED, self.lane.arrived.pin)]
        used.append((ESTOP, self.estop.pin))
        if self.status_led is not None:
            used.append((STATUS_LED, self.status_led.pin))
        return used

    def max_qty(self) -> dict[str, int]:
        return {p.product_id: p.max_qty for p in self.products}

    def seconds_per_unit_for(self, station_id: str, product_id: str) -> float:
        station = next(s for s in self.stations if s.id == station_id)
        hint = station.build.get(product_id)
        return hint.seconds_per_unit if hint else self.seconds_per_unit


def _no_repeats(what: str, values: list[object]) -> None:
    repeated = sorted(str(v) for v, n in Counter(values).items() if n > 1)
    if repeated:
        raise ValueError(f"{what} used more than once: {', '.join(repeated)}")


def load_profile(path: Path) -> Profile:
    """Read and validate a profile; a ConfigError says what is wrong and where."""
    if not path.exists():
        raise ConfigError(f"profile {path} not found", key="profile")
    data = read_yaml(path, "profile", "profile")
    try:
        return Profile.model_validate(data)
    except ValidationError as error:
        raise invalid(str(path), error) from error
