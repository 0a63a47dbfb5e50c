"""A simulated year: the simulated cell at full speed, order after order, with retention on.

    python -m tests.support.soak [--orders N] [--retention archive|off] [--max-mb MB] [--folder DIR]

The agent runs in-process with its MQTT gateway on a real Mosquitto (so the outbox
cursor moves as the broker acknowledges, and retention follows it), and a
`log show --follow` beside it all along (a long-lived reader of the log). Orders of
one unit go in waves of `WAVE`, each wave to the end before the next. Every
`SAMPLE_EVERY` orders it records the disk the log takes (file, WAL, archives), the
process's RSS, its open file descriptors and threads; all along, how long each commit
took and how late the event loop ran a timer (a commit waits that long at most for
whatever else runs on the loop: retention's slices among them). At the end the log
is verified. Prints the figures as JSON (the README's come from here).

gpiozero's mock pins record every change they make, for tests to assert on: the
soak clears that record at every sample (a real pin keeps none), so that the RSS
it reports is the agent's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from benchmarks.common import proc_rss_mb
from edge_agent.agent import Agent
from edge_agent.gateway import Gateway
from edge_agent.log.store import EventLog
from edge_agent.log.verify import verify
from tests.support import ROOT
from tests.support.brokers import mosquitto
from tests.support.configs import agent_config
from tests.support.orders import order

SPEED = 10_000  # the simulated machine and every workflow delay this many times faster
WAVE = 30  # orders submitted together; the next wave once the cell has shipped them all
SAMPLE_EVERY = 500  # orders between two samples
TICK_S = 0.005  # the loop-lateness probe's period
ORDERS_PER_DAY = 720  # a cell taking an order every two minutes, day and night: what "a year" is counted in


@dataclass(frozen=True)
class Sample:
    orders: int
    seconds: float
    db_bytes: int
    wal_bytes: int
    archive_bytes: int
    record_bytes: int  # of the file, the idempotency record (table `orders`): every order ever taken
    rss_mb: float
    fds: int
    threads: int


@dataclass
class Soak:
    orders: int
    retention: str
    max_mb: float
    samples: list[Sample] = field(default_factory=list)
    # Latencies as counts of 0.01 ms steps: a list of every one would itself grow the RSS it measures.
    commit_ms: Counter[float] = field(default_factory=Counter)
    late_ms: Counter[float] = field(default_factory=Counter)
    seconds: float = 0.0
    compactions: int = 0
    events_removed: int = 0
    archives_removed: int = 0
    longest_step_ms: float = 0.0
    last_seq: int = 0
    base_seq: int = 0
    verify_fault: str | None = None

    def summary(self) -> dict[str, Any]:
        """The figures: sizes and resources over the run, latencies as percentiles."""
        steady = self.samples[len(self.samples) // 3 :] or self.samples
        return {
            "orders": self.orders,
            "days_of_orders": round(self.orders / ORDERS_PER_DAY, 1),
            "retention": self.retention,
            "max_mb": self.max_mb,
            "seconds": round(self.seconds, 1),
            "events": self.last_seq,
            "events_removed": self.events_removed,
            "compactions": self.compactions,
            "archives_removed": self.archives_removed,
            "longest_retention_step_ms": round(self.longest_step_ms, 2),
            "db_mb_max": _mb(max(s.db_bytes for s in self.samples)),
            "db_mb_end": _mb(self.samples[-1].db_bytes),
            "db_less_record_mb_max": _mb(max(s.db_bytes - s.record_bytes for s in self.samples)),
            "record_mb_end": _mb(self.samples[-1].record_bytes),
            "record_bytes_per_order": round(self.samples[-1].record_bytes / self.samples[-1].orders),
            "wal_mb_max": _mb(max(s.wal_bytes for s in self.samples)),
            "archive_mb_max": _mb(max(s.archive_bytes for s in self.samples)),
            "rss_mb_steady": [steady[0].rss_mb, steady[-1].rss_mb],
            "fds": sorted({s.fds for s in steady}),
            "threads": sorted({s.threads for s in steady}),
            "commit_ms": _percentiles(self.commit_ms),
            "loop_late_ms": _percentiles(self.late_ms),
            "verify": self.verify_fault or "ok",
        }


def _mb(n: int) -> float:
    return round(n / (1 << 20), 2)


def _percentiles(counts: Counter[float]) -> dict[str, float]:
    if not counts:
        return {}
    values = sorted(counts.items())
    total = sum(counts.values())

    def at(p: float) -> float:
        rank, seen = max(1, math.ceil(p / 100 * total)), 0
        for value, count in values:
            seen += count
            if seen >= rank:
                return value
        return values[-1][0]

    return {"p50": at(50), "p99": at(99), "max": values[-1][0]}


def _sample(agent: Agent, orders: int, started: float) -> Sample:
    db, wal = agent.journal.log.sizes()
    return Sample(
        orders,
        round(time.monotonic() - started, 1),
        db,
        wal,
        agent.retention.archive_bytes(),
        _record_bytes(agent.config.events_db),
        round(proc_rss_mb(os.getpid()), 1),
        sum(1 for _ in Path("/proc/self/fd").iterdir()),
        threading.active_count(),
    )


def _forget_pin_history(agent: Agent) -> None:
    """gpiozero's mock pins record every change they make, for tests to assert on (about
    0.6 KB an order on the simulated cell): a real pin keeps nothing, so neither does the soak."""
    for pin in agent.devices.pin_factory.pins.values():
        pin.clear_states()


def _record_bytes(path: Path) -> int:
    """The pages of the idempotency record, which retention does not touch (SQLite's dbstat,
    where it is compiled in; 0 where not)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        (size,) = db.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name LIKE '%orders%'").fetchone()
        return int(size)
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


async def _lateness(late_ms: Counter[float]) -> None:
    """How late the loop runs a timer: what any other work on it makes a commit wait."""
    while True:
        due = time.perf_counter() + TICK_S
        await asyncio.sleep(TICK_S)
        late_ms.update([round(max(0.0, time.perf_counter() - due) * 1000, 2)])


async def _run(folder: Path, soak: Soak) -> None:
    log_values: dict[str, Any] = {"retention": "keep"}
    if soak.retention != "off":
        log_values = {"retention": soak.retention, "max_mb": soak.max_mb, "archive_max_mb": 2 * soak.max_mb}
    with mosquitto(folder / "mosquitto") as broker:
        config = agent_config(
            folder / "data",
            device_id="soak",
            speed=SPEED,
            log_level="warning",
            mqtt={"port": broker.port},
            log=log_values,
        )
        async with Agent(config) as agent:
            agent.add_observer(lambda commit: soak.commit_ms.update([round(commit.seconds * 1000, 2)]))
            follower = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "log", "show", "--follow", "--db", str(config.events_db)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            started = time.monotonic()
            try:
                async with asyncio.TaskGroup() as tasks:
                    running = [
                        tasks.create_task(agent.run(), name="agent"),
                        tasks.create_task(Gateway(agent, config).run(), name="gateway"),
                        tasks.create_task(_lateness(soak.late_ms), name="lateness"),
                    ]
                    done = 0
                    while done < soak.orders:
                        wave = [order(f"soak-{done + n:07d}") for n in range(min(WAVE, soak.orders - done))]
                        await asyncio.gather(*(agent.submit(o) for o in wave))
                        await agent.wait_until(lambda state: not state.work_items)
                        done += len(wave)
                        if done % SAMPLE_EVERY < WAVE:
                            _forget_pin_history(agent)
                            soak.samples.append(_sample(agent, done, started))
                    for task in running:
                        task.cancel()
            finally:
                follower.terminate()
                follower.wait()
            soak.seconds = time.monotonic() - started
            soak.compactions = agent.retention.counts.compactions
            soak.events_removed = agent.retention.counts.events_removed
            soak.archives_removed = agent.retention.counts.archives_removed
            soak.longest_step_ms = agent.retention.counts.longest_step_s * 1000
    with EventLog(config.events_db, readonly=True) as log_:
        verdict = verify(log_)
        soak.verify_fault = str(verdict.fault) if verdict.fault else None
        soak.last_seq = log_.head().seq
        soak.base_seq = log_.base().seq


def soak(folder: Path, orders: int, retention: str = "archive", max_mb: float = 2.0) -> Soak:
    """Run `orders` orders through the simulated cell in `folder`; the figures."""
    result = Soak(orders, retention, max_mb)
    with suppress(KeyboardInterrupt):
        asyncio.run(_run(folder, result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--retention", choices=["archive", "drop", "off"], default="archive")
    parser.add_argument("--max-mb", type=float, default=2.0)
    parser.add_argument(
        "--folder", type=Path, default=None, help="keep the run's files here (default: a temporary one)"
    )
    args = parser.parse_args()
    if args.folder is not None:
        result = soak(args.folder, args.orders, args.retention, args.max_mb)
    else:
        with TemporaryDirectory(prefix="edge-agent-soak-") as folder:
            result = soak(Path(folder), args.orders, args.retention, args.max_mb)
    print(json.dumps({"summary": result.summary(), "samples": [asdict(s) for s in result.samples]}, indent=1))


if __name__ == "__main__":
    main()
