"""Benchmarks: each figure beside its raw limit, measured in the same run.

    python -m benchmarks.bench [--events N]      (make bench)

Prints a table and writes bench-results.json in the working directory.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import disk_folder
from benchmarks.idle import bench_idle
from benchmarks.ingest import bench_ingest
from benchmarks.latency import bench_latency
from benchmarks.wear import bench_wear
from edge_agent.domain import events as ev
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.log.journal import Journal
from edge_agent.log.store import EventLog

BATCH = 100
ROUNDS = 3  # each figure is the best of this many runs, alternated with its raw limit


def lifecycle(n: int) -> list[ev.Event]:
    """The events of one order's whole life (as the workflow logs them)."""
    o = f"order-{n:07d}"
    return [
        ev.OrderAccepted(o, "widget-a", 2, "WH1", n % 3, "d" * 64),
        ev.OrderQueued(o),
        ev.StepCompleted(o, 0, "validate"),
        ev.StationAssigned(o, "s1"),
        ev.TimerArmed(o, "unit", "2026-01-01T00:00:10.000000Z"),
        ev.StepCompleted(o, 1, "send_to_factory"),
        ev.UnitBuilt(o, "s1"),
        ev.TimerArmed(o, "unit", "2026-01-01T00:00:20.000000Z"),
        ev.UnitBuilt(o, "s1"),
        ev.BuildComplete(o, "s1"),
        ev.StepCompleted(o, 2, "wait_factory_complete"),
        ev.ShipmentStarted(o),
        ev.TimerArmed(o, "transit", "2026-01-01T00:00:30.000000Z"),
        ev.ShipmentArrived(o),
        ev.InventoryIssued(o, f"INV{n + 1:05d}", "widget-a", 2, "WH1"),
        ev.StepCompleted(o, 3, "move_to_warehouse"),
        ev.StepCompleted(o, 4, "publish_inventory"),
        ev.StepCompleted(o, 5, "tidy_up"),
        ev.TidiedUp(o),
    ]


def history(count: int) -> list[ev.Event]:
    out: list[ev.Event] = [ev.PlantConfigured(("s1", "s2", "s3"), (("widget-a", 100),))]
    n = 0
    while len(out) < count:
        out += lifecycle(n)
        n += 1
    return out[:count]


def seconds(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def rate(count: int, run: Callable[[], None]) -> float:
    return count / seconds(run)


def append_in_batches(log_: EventLog, events: list[ev.Event]) -> None:
    for start in range(0, len(events), BATCH):
        log_.append(events[start : start + BATCH])


def insert_raw(path: Path, rows: Sequence[tuple[object, ...]]) -> None:
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute("PRAGMA synchronous = FULL")
    raw.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts TEXT, type TEXT, subject TEXT, data TEXT, hash TEXT)")
    for start in range(0, len(rows), BATCH):
        raw.execute("BEGIN IMMEDIATE")
        raw.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", rows[start : start + BATCH])
        raw.execute("COMMIT")
    raw.close()


def bench_log_append(folder: Path, count: int) -> dict[str, float]:
    """The log's append (JSON, hash chain, one transaction per batch) against inserting
    the very rows it wrote with raw sqlite3, both WAL + synchronous=FULL."""
    events = history(count)
    ours_rate = raw_rate = 0.0
    for round_ in range(ROUNDS):
        with EventLog(folder / f"append-{round_}.db", synchronous="full") as log_:
            ours_rate = max(ours_rate, rate(count, partial(append_in_batches, log_, events)))
            rows = [(r.seq, r.ts, r.type, r.subject, r.data, r.hash) for r in log_.rows()]
        raw_rate = max(raw_rate, rate(count, partial(insert_raw, folder / f"raw-{round_}.db", rows)))
    return {"events_per_s": ours_rate, "raw_events_per_s": raw_rate, "ratio": ours_rate / raw_rate}


def bench_replay(folder: Path, count: int) -> dict[str, float]:
    """Replay streams the rows from the file, decodes and folds them; the raw limit
    reads the same rows' JSON from the same file and only decodes it."""
    path = folder / "replay.db"
    events = history(count)
    with Journal.open(path, synchronous="normal", snapshot_every=1000) as journal:
        for start in range(0, len(events), 1000):
            journal.append(events[start : start + 1000])
    del events  # a million live objects would slow both sides' garbage collection
    with EventLog(path, readonly=True) as log_:
        raw = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)

        def fold_all() -> None:
            fold(State(), log_.read())

        def decode_all() -> None:
            for (data,) in raw.execute("SELECT data FROM events ORDER BY seq"):
                orjson.loads(data)

        # Alternate the two and keep the best of each: a busy neighbour slows one run, not the figure.
        fold_rate = decode_rate = 0.0
        for _ in range(ROUNDS):
            fold_rate = max(fold_rate, rate(count, fold_all))
            decode_rate = max(decode_rate, rate(count, decode_all))
        raw.close()
    small = folder / "small.db"
    with Journal.open(small, synchronous="normal", snapshot_every=1000) as journal:
        journal.append(history(1000))
    return {
        "events_per_s": fold_rate,
        "raw_decode_events_per_s": decode_rate,
        "ratio": fold_rate / decode_rate,
        "restart_s": min(seconds(lambda: Journal.open(path).close()) for _ in range(ROUNDS)),
        "restart_s_small_log": min(seconds(lambda: Journal.open(small).close()) for _ in range(ROUNDS)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the replay log")
    parser.add_argument("--append-events", type=int, default=100_000, help="events appended at FULL durability")
    parser.add_argument("--orders", type=int, default=10_000, help="orders sent through the broker (ingest)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="length of the idle window")
    parser.add_argument("--edges", type=int, default=2000, help="sensor edges timed (latency)")
    parser.add_argument("--wear-orders", type=int, default=200, help="orders run to completion (wear)")
    args = parser.parse_args()
    benches: dict[str, tuple[str, Callable[[Path], dict[str, float]]]] = {
        "log_append": (
            f"{args.append_events} events in batches of {BATCH}, synchronous=FULL",
            partial(bench_log_append, count=args.append_events),
        ),
        "replay": (f"{args.events} events", partial(bench_replay, count=args.events)),
        "ingest": (f"{args.orders} orders through Mosquitto at QoS 1", partial(bench_ingest, orders=args.orders)),
        "idle": (
            f"{args.idle_seconds:.0f} s of the whole agent without orders",
            partial(bench_idle, seconds=args.idle_seconds),
        ),
        "latency": (f"{args.edges} sensor edges to their committed events", partial(bench_latency, samples=args.edges)),
        "wear": (f"{args.wear_orders} orders run to completion", partial(bench_wear, orders=args.wear_orders)),
    }
    results: dict[str, Any] = {}
    for name, (what, bench) in benches.items():
        print(f"{name}: {what} ...", flush=True)
        with disk_folder() as folder:  # fresh, on a real disk: durability and write counts mean nothing on tmpfs
            results[name] = bench(folder)
    print(f"\n{'figure':<40}{'value':>16}")
    for section, figures in results.items():
        for name, value in figures.items():
            print(f"{section + '.' + name:<40}{value:>16,.3f}")
    Path("bench-results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
