"""Disk writes per completed order (flash wear), beside the bytes the log has to hold.

    python -m benchmarks.wear [--orders N]

`wear.bytes_written_per_order`: the whole agent in a child process (`python -m
edge_agent run`, MQTT 5 through a local Mosquitto, synchronous=FULL, snapshots every
1000 events, the outbox publishing every event) runs the simulated cell 100x faster
than real time; N orders of one unit are published at once, and the agent's
`write_bytes` (/proc/<pid>/io: bytes the process sent towards the block layer, its
SQLite WAL, checkpoints, snapshots and outbox cursor included) is read from just
before the orders are published until every order is tidied up and the outbox
cursor has caught up with the log, divided by N. The data folder is on a real disk
(write_bytes counts nothing on tmpfs); should the counter still stay at zero, the
figure falls back to `wchar` (bytes handed to write(), cached or not) and its key
says so: `wear.wchar_bytes_per_order`.

The raw references, from the log itself: `wear.raw_row_bytes_per_order`, the bytes of
the rows the run appended (seq, ts, type, subject, data, hash) per order, and
`wear.raw_data_bytes_per_order`, the JSON `data` of those events alone. `wear.ratio`
is raw_row_bytes_per_order / bytes_written_per_order (1 would be no write
amplification at all: SQLite writes whole pages, and each commit of a FULL WAL writes
at least one).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from benchmarks.common import (
    PREFIX,
    BenchError,
    LogWatch,
    agent_config,
    agent_process,
    filesystem_type,
    mosquitto,
    order_lines,
    proc_io,
    publish_lines,
    run_alone,
)

ORDERS = 200
SPEED = 100.0  # 10 ms a unit, 30 ms a transit: still above the profile's 5 ms debounce
TIMEOUT_S = 300.0


def _outbox_caught_up(db: Path) -> bool:
    with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
        (last,) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        row = conn.execute("SELECT seq FROM cursors WHERE name = 'outbox'").fetchone()
    return row is not None and row[0] >= last


def _appended(db: Path, after_seq: int) -> tuple[int, int, int]:
    """(row bytes, data bytes, rows) of the events after `after_seq`."""
    with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as conn:
        row_bytes, data_bytes, rows = conn.execute(
            "SELECT sum(8 + length(ts) + length(type) + length(subject) + length(data) + length(hash)),"
            " sum(length(data)), count(*) FROM events WHERE seq > ?",
            (after_seq,),
        ).fetchone()
    return int(row_bytes), int(data_bytes), int(rows)


def bench_wear(folder: Path, orders: int = ORDERS) -> dict[str, float]:
    device = "bench-wear"
    db = folder / "agent" / "data" / "events.db"
    watch = LogWatch(db)
    with mosquitto(folder / "broker") as broker:
        config = agent_config(folder / "agent", broker.port, device, speed=SPEED)
        with agent_process(config, device, broker.port) as agent:

            def alive() -> None:
                if agent.poll() is not None:
                    raise BenchError(f"the agent exited with {agent.returncode} during the run")

            time.sleep(1.5)  # the outbox cursor of the start-up events saved: not the orders' writes
            watch.poll()
            start_seq = watch.last_seq
            before = proc_io(agent.pid)
            publish_lines(broker.port, f"{PREFIX}/orders", order_lines(orders, "wear")).wait(TIMEOUT_S)
            watch.wait("TidiedUp", orders, TIMEOUT_S, alive, every=0.1)
            deadline = time.monotonic() + 30
            while not _outbox_caught_up(db):
                alive()
                if time.monotonic() > deadline:
                    raise BenchError("the outbox did not catch up with the log")
                time.sleep(0.1)  # the cursor is saved once a second
            after = proc_io(agent.pid)
            issued = watch.poll().get("InventoryIssued", 0)
    watch.close()
    if issued != orders:
        raise BenchError(f"{issued} of {orders} orders reached the warehouse (the others failed)")
    row_bytes, data_bytes, rows = _appended(db, start_seq)
    written = after["write_bytes"] - before["write_bytes"]
    figures: dict[str, float] = {}
    if written > 0:
        figures["bytes_written_per_order"] = written / orders
    else:
        print(f"write_bytes stayed at 0 on {filesystem_type(db)}: falling back to wchar")
        written = after["wchar"] - before["wchar"]
        figures["wchar_bytes_per_order"] = written / orders
    figures |= {
        "raw_row_bytes_per_order": row_bytes / orders,
        "raw_data_bytes_per_order": data_bytes / orders,
        "events_per_order": rows / orders,
        "ratio": row_bytes / written,
    }
    return figures


if __name__ == "__main__":
    run_alone(__doc__, "wear", bench_wear, "orders", ORDERS, "orders completed")
