"""A machine behind a simulated profile's mock pins, so the agent runs on any laptop.

While a station's `run` output is on it finishes a unit every
`seconds_per_unit / speed` (a unit in progress is lost if the output goes off);
while the conveyor runs, the batch arrives `transit_s / speed` later. Faults can
be injected: a jammed station never finishes a unit, a lost batch never arrives.
The agent's logic does not know whether it talks to this or to real hardware.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edge_agent.cell import ARRIVED, CONVEYOR, UNIT_DONE, run_output, station_input
from edge_agent.devices.gpio import Devices
from edge_agent.devices.profile import Profile


class Simulator:
    def __init__(
        self,
        profile: Profile,
        devices: Devices,
        speed: float,
        seconds_per_unit: Callable[[str], float],
    ) -> None:
        self._profile = profile
        self._devices = devices
        self._speed = speed
        self._seconds_per_unit = seconds_per_unit
        self._changed: dict[str, asyncio.Event] = {name: asyncio.Event() for name in devices.outputs}
        # Counted, not read: an output switched off and straight on again in one turn of the
        # agent's loop is still a stop (the level alone would not show it).
        self._offs: dict[str, int] = dict.fromkeys(devices.outputs, 0)
        self._loop = asyncio.get_running_loop()
        self.jammed: set[str] = set()  # stations that never finish a unit
        self.batches_to_lose = 0  # the next this many batches never arrive
        self.units_finished = 0
        self.batches_delivered = 0
        devices.watch(self._output_changed)

    def _output_changed(self, name: str, on: bool) -> None:
        # May run on gpiozero's thread (an e-stop turning everything off).
        self._loop.call_soon_threadsafe(self._note_change, name, on)

    def _note_change(self, name: str, on: bool) -> None:
        if not on:
            self._offs[name] += 1
        self._changed[name].set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for station in self._profile.stations:
                tasks.create_task(self._station(station.id), name=f"simulator {station.id}")
            tasks.create_task(self._lane(), name="simulator lane")

    async def _station(self, station_id: str) -> None:
        output = run_output(station_id)
        while True:
            await self._until_on(output)
            seconds = self._seconds_per_unit(station_id) / self._speed
            if await self._stays_on(output, seconds) and station_id not in self.jammed:
                self.units_finished += 1
                self._devices.pulse_input(station_input(station_id, UNIT_DONE))
                await asyncio.sleep(0)  # let the agent see the unit before the next one starts

    async def _lane(self) -> None:
        while True:
            await self._until_on(CONVEYOR)
            if not await self._stays_on(CONVEYOR, self._profile.lane.transit_s / self._speed):
                continue
            if self.batches_to_lose:
                self.batches_to_lose -= 1
                await self._until_stopped(CONVEYOR)  # fell off the belt: nothing arrives
                continue
            self.batches_delivered += 1
            self._devices.pulse_input(ARRIVED)
            await asyncio.sleep(0)

    async def _until_on(self, output: str) -> None:
        while not self._devices.is_on(output):
            await self._next_change(output)

    async def _until_stopped(self, output: str) -> None:
        """Until `output` has been switched off at least once from now."""
        offs = self._offs[output]
        while self._offs[output] == offs:
            await self._next_change(output)

    async def _next_change(self, output: str) -> None:
        changed = self._changed[output]
        changed.clear()
        await changed.wait()

    async def _stays_on(self, output: str, seconds: float) -> bool:
        """Whether `output` stays on, without a single stop, for `seconds` from now."""
        deadline = self._loop.time() + seconds
        offs = self._offs[output]
        while self._devices.is_on(output) and self._offs[output] == offs:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return True
            try:
                async with asyncio.timeout(remaining):  # not wait_for: it can swallow a cancellation on 3.11
                    await self._next_change(output)
            except TimeoutError:
                break
        return self._devices.is_on(output) and self._offs[output] == offs
