"""The profile's devices as gpiozero objects: the one module that touches gpiozero.

gpiozero is untyped, so it stays behind this adapter. Every device gets the
pin factory passed in explicitly (never gpiozero's global). Input edges reach
asyncio through `loop.call_soon_threadsafe`, which works for both shapes of
callback: real pin factories call back on their own thread, MockFactory calls
back synchronously on whichever thread drove the pin. Debounce is applied here
in software as well, on a monotonic clock, because MockFactory stores
`bounce_time` but does not apply it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpiozero import DigitalInputDevice, DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from edge_agent.cell import ARRIVED, CONVEYOR, ESTOP, FAULT, STATUS_LED, UNIT_DONE, run_output, station_input
from edge_agent.devices.profile import InputPin, OutputPin, Profile
from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Edge:
    """An input became active (`active`) or inactive."""

    name: str  # an input of `edge_agent.cell`
    active: bool


def make_pin_factory(kind: str) -> Any:
    """MockFactory for simulated profiles; the platform's own factory otherwise."""
    if kind == "mock":
        return MockFactory()
    try:  # lgpio is gpiozero's default on Raspberry Pi OS bookworm; RPi.GPIO on older systems
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    except Exception as lgpio_error:
        try:
            from gpiozero.pins.rpigpio import RPiGPIOFactory

            return RPiGPIOFactory()
        except Exception:
            raise ConfigError(
                f"no GPIO pin factory available ({lgpio_error}); on a Pi install python3-lgpio, "
                "elsewhere use a simulated profile",
                key="profile",
            ) from lgpio_error


class Devices:
    """Outputs switched from the state; input edges delivered to one handler on the event loop."""

    def __init__(
        self,
        profile: Profile,
        pin_factory: Any,
        loop: asyncio.AbstractEventLoop,
        on_edge: Callable[[Edge], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pin_factory = pin_factory
        self._loop = loop
        self._on_edge = on_edge
        self._monotonic = monotonic
        self._last_edge: dict[str, float] = {}
        self._watchers: list[Callable[[str, bool], None]] = []
        # The e-stop turns outputs off from gpiozero's thread while the loop may be switching them.
        self._switching = threading.Lock()
        # Outputs first, created off: nothing runs before the state says so.
        self.outputs: dict[str, Any] = {}
        for station in profile.stations:
            self.outputs[run_output(station.id)] = self._output(station.run)
        self.outputs[CONVEYOR] = self._output(profile.lane.conveyor)
        if profile.status_led is not None:
            self.outputs[STATUS_LED] = self._output(profile.status_led)
        self.inputs: dict[str, Any] = {}
        self._bounce: dict[str, float] = {}
        self._active_high: dict[str, bool | None] = {}
        for station in profile.stations:
            self._input(station_input(station.id, UNIT_DONE), station.unit_done)
            if station.fault is not None:
                self._input(station_input(station.id, FAULT), station.fault)
        self._input(ARRIVED, profile.lane.arrived)
        self._input(ESTOP, profile.estop, both_edges=True)

    def _output(self, spec: OutputPin) -> Any:
        return DigitalOutputDevice(
            spec.pin, active_high=spec.active_high, initial_value=False, pin_factory=self.pin_factory
        )

    def _input(self, name: str, spec: InputPin, both_edges: bool = False) -> None:
        device = DigitalInputDevice(
            spec.pin,
            pull_up=spec.pull_up,
            active_state=spec.active_high,  # None unless floating; then gpiozero needs it
            bounce_time=spec.bounce_time,
            pin_factory=self.pin_factory,
        )
        self._bounce[name] = spec.bounce_time or 0.0
        self._active_high[name] = spec.active_high if spec.pull_up is None else not spec.pull_up
        device.when_activated = lambda _device: self._edge(name, True)
        if both_edges:
            device.when_deactivated = lambda _device: self._edge(name, False)
        self.inputs[name] = device

    def _edge(self, name: str, active: bool) -> None:
        """Runs on gpiozero's thread (or the driving thread for MockFactory)."""
        now = self._monotonic()
        key = f"{name}:{active}"
        if now - self._last_edge.get(key, -1e9) < self._bounce[name]:
            return  # chatter within the bounce time: the same edge again
        self._last_edge[key] = now
        if name == ESTOP and active:
            self.all_off()  # safety first, on this very thread; the event is logged right after
        self._loop.call_soon_threadsafe(self._on_edge, Edge(name, active))

    @property
    def estop_active(self) -> bool:
        return bool(self.inputs[ESTOP].is_active)

    def apply(self, wanted: dict[str, bool]) -> None:
        """Switch the outputs to `wanted`; with the e-stop input active, everything stays off."""
        with self._switching:
            hold_off = self.estop_active
            for name, device in self.outputs.items():
                self._switch(name, device, wanted.get(name, False) and not hold_off)

    def all_off(self) -> None:
        with self._switching:
            for name, device in self.outputs.items():
                self._switch(name, device, False)

    def _switch(self, name: str, device: Any, on: bool) -> None:
        if bool(device.value) == on:
            return
        device.value = on
        log.debug("output %s %s", name, "on" if on else "off")
        for watcher in self._watchers:
            watcher(name, on)

    def is_on(self, name: str) -> bool:
        return bool(self.outputs[name].value)

    def watch(self, watcher: Callable[[str, bool], None]) -> None:
        """Call `watcher(output name, on)` whenever an output changes (the simulator listens)."""
        self._watchers.append(watcher)

    def drive_input(self, name: str, active: bool) -> None:
        """Drive a mock input pin so that the input reads `active` (simulator and tests)."""
        pin = self.inputs[name].pin
        if active == self._active_high[name]:
            pin.drive_high()
        else:
            pin.drive_low()

    def pulse_input(self, name: str) -> None:
        """One activation of a mock input: active, then inactive again."""
        self.drive_input(name, True)
        self.drive_input(name, False)

    def pin(self, name: str) -> Any:
        """The gpiozero pin behind a device (MockPin in simulations and tests)."""
        device = self.outputs.get(name) or self.inputs[name]
        return device.pin

    def close(self) -> None:
        """Outputs off, then release every pin."""
        self.all_off()
        for device in [*self.outputs.values(), *self.inputs.values()]:
            device.close()
