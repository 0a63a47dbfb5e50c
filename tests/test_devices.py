"""Device profiles, the gpiozero adapter (debounce, both callback shapes, e-stop)
and the machine simulator, on real gpiozero devices over MockFactory pins."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from edge_agent.devices.gpio import Devices, Edge
from edge_agent.devices.profile import Profile, load_profile
from edge_agent.devices.simulator import Simulator
from edge_agent.errors import ConfigError
from tests.support import PROFILE, ROOT


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def profile() -> Profile:
    return load_profile(PROFILE)


class Rig:
    """Devices on a fresh MockFactory, with the edges they deliver to the loop."""

    def __init__(self, profile: Profile, loop: asyncio.AbstractEventLoop) -> None:
        self.factory = MockFactory()
        self.edges: list[Edge] = []
        self.arrived = asyncio.Event()
        self.clock = FakeMonotonic()
        self.devices = Devices(profile, self.factory, loop, self._edge, monotonic=self.clock)

    def _edge(self, edge: Edge) -> None:
        self.edges.append(edge)
        self.arrived.set()

    def close(self) -> None:
        self.devices.close()
        self.factory.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def rig(profile: Profile, loop: asyncio.AbstractEventLoop) -> Iterator[Rig]:
    rig = Rig(profile, loop)
    yield rig
    rig.close()


def settle(loop: asyncio.AbstractEventLoop) -> None:
    """Run the callbacks that call_soon_threadsafe queued."""
    loop.run_until_complete(asyncio.sleep(0))


# -- profiles -------------------------------------------------------------------


def test_the_shipped_profiles_are_valid() -> None:
    simulated = load_profile(PROFILE)
    assert [s.id for s in simulated.stations] == ["s1", "s2", "s3"]
    assert simulated.max_qty() == {"widget-a": 100, "gadget-b": 100}
    assert simulated.pin_factory == "mock"
    real = load_profile(ROOT / "device_profiles" / "rpi-2station.yaml")
    assert real.pin_factory == "default"
    assert len(real.stations) == 2


PROFILE_TEXT = """name: x
pin_factory: mock
stations:
  - id: a
    run: {pin: 5}
    unit_done: {pin: 6}
lane: {conveyor: {pin: 7}, arrived: {pin: 8}}
estop: {pin: 9, pull_up: true}
products: [{product_id: w, max_qty: 3}]
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("unit_done: {pin: 6}", "unit_done: {pin: 5}"), "pin 5 is used more than once: a.run and a.unit_done"),
        (("name: x", "name: x\ncolour: red"), "colour: unknown key"),
        (("max_qty: 3", "max_qty: 0"), "products.0.max_qty"),
        (("products: [{product_id: w, max_qty: 3}]", "products: [{product_id: w, max_qty: 3, price: 2}]"), "price"),
        (("run: {pin: 5}", "run: {pin: 5}\n    build: {z: {seconds_per_unit: 1}}"), "unknown product 'z'"),
        (("estop: {pin: 9, pull_up: true}", "estop: {pin: 9, pull_up: null}"), "needs active_high"),
        (("pin: 9", "pin: 99"), "estop.pin"),
        (("name: x", "name: x\nname: y"), "name: given twice"),
        (("estop: {pin: 9, pull_up: true}", "estop: {pin: 9, pin: 10, pull_up: true}"), "estop.pin: given twice"),
        (("run: {pin: 5}", "run: {pin: 5}\n    on_fault: retry"), "retry needs a fault input"),
    ],
)
def test_a_bad_profile_is_a_clear_error(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE_TEXT.replace(*change), encoding="utf-8")
    load_profile_ok = tmp_path / "ok.yaml"
    load_profile_ok.write_text(PROFILE_TEXT, encoding="utf-8")
    load_profile(load_profile_ok)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_profile(path)


def test_profile_check_exits_2_with_one_line_and_0_when_valid(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PROFILE_TEXT.replace("unit_done: {pin: 6}", "unit_done: {pin: 5}"), encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "edge_agent", "profile", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "pin 5 is used more than once" in bad.stderr
    good = subprocess.run(
        [sys.executable, "-m", "edge_agent", "profile", "check", str(PROFILE), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0
    assert '"stations":["s1","s2","s3"]' in good.stdout


def test_a_profile_that_is_not_a_regular_file_is_one_line_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(ConfigError, match="the profile is not a regular file"):
        load_profile(fifo)
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ConfigError, match="the profile is not a regular file"):
        load_profile(tmp_path / "zero.yaml")


def test_profile_check_without_a_file_checks_the_configs_profile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROFILE_TEXT.replace("unit_done: {pin: 6}", "unit_done: {pin: 5}"), encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"profile: {bad.name}\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "profile", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "pin 5 is used more than once" in done.stderr


def test_profile_list_marks_the_configured_profile(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"profile: {PROFILE}\n", encoding="utf-8")
    listed = subprocess.run(
        [sys.executable, "-m", "edge_agent", "profile", "list", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["simulated"]["configured"] is True
    assert rows["rpi-2station"]["configured"] is False


# -- the gpiozero adapter -------------------------------------------------------


def test_every_output_starts_off(rig: Rig) -> None:
    for name in rig.devices.outputs:
        assert rig.devices.pin(name).state is False


def test_outputs_follow_the_wanted_state_but_stay_off_while_the_estop_input_is_active(rig: Rig) -> None:
    rig.devices.apply({"s1.run": True, "lane.conveyor": True})
    assert rig.devices.is_on("s1.run")
    assert rig.devices.is_on("lane.conveyor")
    assert not rig.devices.is_on("s2.run")
    rig.devices.drive_input("estop", True)
    assert not any(rig.devices.is_on(name) for name in rig.devices.outputs)  # off at once, in the callback
    rig.devices.apply({"s1.run": True})
    assert not rig.devices.is_on("s1.run")  # the e-stop input holds everything off


def test_chatter_within_the_bounce_time_counts_once(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
    for _ in range(3):  # a bouncing contact: three edges within 2 ms
        rig.devices.pulse_input("s1.unit_done")
        rig.clock.now += 0.001
    settle(loop)
    assert rig.edges == [Edge("s1.unit_done", True)]
    rig.clock.now += 0.01  # past the 5 ms bounce time: a new unit
    rig.devices.pulse_input("s1.unit_done")
    settle(loop)
    assert rig.edges == [Edge("s1.unit_done", True)] * 2


def test_an_input_callback_on_another_thread_reaches_the_loop_and_the_estop_acts_on_that_thread(
    rig: Rig, loop: asyncio.AbstractEventLoop
) -> None:
    """Real pin factories call back on their own thread; MockFactory calls back on the
    thread that drives the pin, so driving it from a thread gives that shape."""
    rig.devices.apply({"s2.run": True})
    seen_off_on_thread: list[bool] = []

    def press() -> None:
        rig.devices.drive_input("estop", True)
        seen_off_on_thread.append(not rig.devices.is_on("s2.run"))
        rig.devices.pulse_input("lane.arrived")

    thread = threading.Thread(target=press)
    thread.start()
    thread.join()
    assert seen_off_on_thread == [True]  # outputs were off before the loop heard of the e-stop
    assert rig.edges == []  # nothing ran on the loop from the other thread
    loop.run_until_complete(asyncio.wait_for(rig.arrived.wait(), 5))
    settle(loop)
    assert rig.edges == [Edge("estop", True), Edge("lane.arrived", True)]


def test_the_estop_reports_release_too(rig: Rig, loop: asyncio.AbstractEventLoop) -> None:
    rig.devices.drive_input("estop", True)
    rig.clock.now += 1
    rig.devices.drive_input("estop", False)
    settle(loop)
    assert rig.edges == [Edge("estop", True), Edge("estop", False)]
    assert not rig.devices.estop_active


# -- the simulator ---------------------------------------------------------------


def test_the_simulator_builds_units_while_run_is_on_and_delivers_after_transit(profile: Profile) -> None:
    async def scenario() -> tuple[list[Edge], int]:
        edges: list[Edge] = []
        got = asyncio.Event()

        def on_edge(edge: Edge) -> None:
            edges.append(edge)
            got.set()

        factory = MockFactory()
        devices = Devices(profile, factory, asyncio.get_running_loop(), on_edge)
        simulator = Simulator(profile, devices, speed=100, seconds_per_unit=lambda station: 1.0)
        running = asyncio.create_task(simulator.run())
        try:
            devices.apply({"s2.run": True})
            while sum(e.name == "s2.unit_done" for e in edges) < 2:
                got.clear()
                await asyncio.wait_for(got.wait(), 5)
            devices.apply({"s2.run": False})
            simulator.jammed.add("s3")
            devices.apply({"lane.conveyor": True, "s3.run": True})
            while not any(e.name == "lane.arrived" for e in edges):
                got.clear()
                await asyncio.wait_for(got.wait(), 5)
            return edges, simulator.units_finished
        finally:
            running.cancel()
            devices.close()
            factory.close()

    edges, units = asyncio.run(scenario())
    assert [e.name for e in edges].count("s2.unit_done") == 2
    assert "s3.unit_done" not in [e.name for e in edges]  # jammed
    assert units == 2
