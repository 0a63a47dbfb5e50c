"""Sensor edge to committed event, beside a bare gpiozero callback and one raw commit.

    python -m benchmarks.latency [--samples N]

`latency.edge_to_commit_ms_p50` / `_p99`: the agent runs in-process on the simulated
profile (gpiozero MockFactory pins, its log on disk at synchronous=FULL), with three
orders building. The simulated machine is slowed down so that it never finishes a
unit itself; instead a thread of this benchmark, standing in for the pin factory's
callback thread, drives a station's `unit_done` pin active, as the simulator does
(Devices.drive_input). The time runs from just before the pin is driven to the
journal's commit listener seeing the committed UnitBuilt event (time.perf_counter on
both ends): gpiozero's callback, the hand-off to the event loop, decide, the SQLite
commit with its fsync, and the fold. Stations are used in turn, so that no edge
falls within a station's debounce time of the one before.

The raw limit, `latency.raw_edge_to_commit_ms_p50` / `_p99`: the same MockFactory
pin edge to a bare gpiozero `when_activated` callback that inserts one event-sized
row into a raw sqlite3 database (WAL, synchronous=FULL) on the same disk and commits
it. Raw edges alternate with the agent's, one for one, so that both meet the same
disk and CPU contention (a shared machine's fsync times vary from minute to minute).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpiozero import DigitalInputDevice
from gpiozero.pins.mock import MockFactory

from benchmarks.common import BenchError, percentile, run_alone
from edge_agent.agent import Agent
from edge_agent.log.journal import Commit
from tests.support.configs import agent_config
from tests.support.orders import order

SAMPLES = 2000
WARM_UP = 20  # edges not counted: first use of every code path and of the file
BOUNCE_GAP_S = 0.006  # the simulated profile debounces unit_done for 5 ms per station
SPEED = 0.001  # the machine would take 1000 s per unit, and timeouts are as long
QTY = 100
TIMEOUT_S = 5.0
RAW_ROW = ("2026-01-01T00:00:00.000000Z", "UnitBuilt", "order-0000001", '{"order_id":"order-0000001","station":"s1"}')


@dataclass
class _Edge:
    """One edge in flight: committed once the order has more units than before."""

    order_id: str
    units_before: int
    started: float
    committed: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class _RawCell:
    """A bare gpiozero input whose callback commits one row with raw sqlite3."""

    def __init__(self, folder: Path) -> None:
        self._db = sqlite3.connect(folder / "raw.db", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts TEXT, type TEXT, subject TEXT, data TEXT)")
        self._factory: Any = MockFactory()
        self._device: Any = DigitalInputDevice(27, pin_factory=self._factory)
        self._device.when_activated = self._on_edge
        self._committed = 0.0

    def _on_edge(self, _device: Any) -> None:
        self._db.execute("INSERT INTO events (ts, type, subject, data) VALUES (?, ?, ?, ?)", RAW_ROW)  # autocommit
        self._committed = time.perf_counter()

    def edge(self) -> float:
        """Seconds from driving the pin to the row committed."""
        started = time.perf_counter()
        self._device.pin.drive_high()  # MockFactory calls back on this very thread
        self._device.pin.drive_low()
        return self._committed - started

    def close(self) -> None:
        self._device.close()
        self._factory.close()
        self._db.close()


def _drive(agent: Agent, raw: _RawCell, samples: int, pending: list[_Edge | None]) -> tuple[list[float], list[float]]:
    """On a thread of its own, as a pin factory's callbacks are: edge after edge, the
    agent's and the raw cell's in turn."""
    stations = [s.id for s in agent.state.stations]
    last_edge = dict.fromkeys(stations, 0.0)
    latencies, raw_latencies = [], []
    for n in range(samples + WARM_UP):
        station_id = stations[n % len(stations)]
        deadline = time.monotonic() + TIMEOUT_S
        while True:  # a station just freed gets its next order from the control loop
            state = agent.state
            station = state.station(station_id)
            item = state.work_items.get(station.order_id) if station and station.order_id else None
            if item is not None and item.units_done < item.qty:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"station {station_id} has nothing to build")
            time.sleep(0.001)
        wait = last_edge[station_id] + BOUNCE_GAP_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        edge = _Edge(item.order_id, item.units_done, time.perf_counter())
        pending[0] = edge
        agent.devices.drive_input(f"{station_id}.unit_done", True)
        if not edge.done.wait(TIMEOUT_S):
            raise BenchError(f"no unit committed for {item.order_id} within {TIMEOUT_S} s")
        agent.devices.drive_input(f"{station_id}.unit_done", False)
        last_edge[station_id] = time.monotonic()
        raw_latency = raw.edge()
        if n >= WARM_UP:
            latencies.append(edge.committed - edge.started)
            raw_latencies.append(raw_latency)
    return latencies, raw_latencies


async def _latencies(folder: Path, samples: int) -> tuple[list[float], list[float]]:
    """Edge-to-commit seconds of the agent and of the raw cell, `samples` of each."""
    config = agent_config(folder / "data", device_id="bench-latency", speed=SPEED, log_level="warning")
    pending: list[_Edge | None] = [None]

    def committed(commit: Commit) -> None:
        now = time.perf_counter()
        state = commit.state
        edge = pending[0]
        if edge is None or edge.done.is_set():
            return
        item = state.work_items.get(edge.order_id)
        if item is None or item.units_done > edge.units_before:
            edge.committed = now
            edge.done.set()

    async with Agent(config) as agent:
        running = asyncio.create_task(agent.run())
        try:
            orders = (samples + WARM_UP) // (QTY - 1) + len(agent.state.stations) + 1
            for n in range(orders):
                await agent.submit(order(f"latency-{n:05d}", QTY))
            await agent.wait_until(lambda state: all(s.order_id for s in state.stations))
            agent.add_observer(committed)
            raw = _RawCell(folder)
            try:
                return await asyncio.to_thread(_drive, agent, raw, samples, pending)
            finally:
                raw.close()
        finally:
            running.cancel()
            with suppress(asyncio.CancelledError):
                await running


def bench_latency(folder: Path, samples: int = SAMPLES) -> dict[str, float]:
    agent_s, raw_s = asyncio.run(_latencies(folder, samples))
    ours, raw = [s * 1000 for s in agent_s], [s * 1000 for s in raw_s]
    p50, p99 = percentile(ours, 50), percentile(ours, 99)
    raw_p50, raw_p99 = percentile(raw, 50), percentile(raw, 99)
    return {
        "edge_to_commit_ms_p50": p50,
        "edge_to_commit_ms_p99": p99,
        "edge_to_commit_ms_max": max(ours),
        "raw_edge_to_commit_ms_p50": raw_p50,
        "raw_edge_to_commit_ms_p99": raw_p99,
        "ratio_p50": raw_p50 / p50,  # as every ratio here: raw limit over ours when lower is better
        "ratio_p99": raw_p99 / p99,
    }


if __name__ == "__main__":
    run_alone(__doc__, "latency", bench_latency, "samples", SAMPLES, "edges measured")
