"""A reader process for the concurrency tests: reads the log while another process writes.

Run as `python -m tests.support.log_reader MODE PATH` from the project root.

`follow`: reads the whole log again and again, each time through a fresh
read-only `EventLog`, checking that the read is a consistent prefix (seqs 1, 2,
3 ... and an intact hash chain, not ending inside a multi-event commit).
Prints `saw N HASH` each time it sees a new length. When stdin says `stop N`, it
reads until it has seen length N, then prints `report {json}` and exits.

`hold`: starts iterating `rows()` and stops after the first row, printing
`holding SEQ`, so that its read transaction stays open; after a line on stdin
it reads the rest and prints `report {json}`.
"""

from __future__ import annotations

import json
import select
import sys
from pathlib import Path
from typing import Any

from edge_agent.log.journal import checked
from edge_agent.log.store import GENESIS_HASH, EventLog, Row


def read_prefix(path: Path) -> list[Row]:
    """One consistent read of the whole log; raises if it is not a clean prefix."""
    with EventLog(path, readonly=True) as log_:
        rows = list(checked(log_.rows(), 0, GENESIS_HASH))  # seqs from 1 without gaps, chain intact
    if rows and rows[-1].type == "ShipmentArrived":  # always committed together with its InventoryIssued
        raise AssertionError(f"read ends inside a commit, at seq {rows[-1].seq}")
    return rows


def stop_target() -> int | None:
    """The final length, once the writer has said it is done (without blocking)."""
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    if not ready:
        return None
    word, target = sys.stdin.readline().split()
    assert word == "stop"
    return int(target)


def follow(path: Path) -> dict[str, Any]:
    reads = 0
    lengths: list[int] = []
    errors: list[str] = []
    target: int | None = None
    while target is None or not lengths or lengths[-1] != target:
        if target is None:
            target = stop_target()
        try:
            rows = read_prefix(path)
        except Exception as error:  # reported, not raised: the test asserts there are none
            errors.append(f"{type(error).__name__}: {error}")
            if len(errors) > 20:
                break
            continue
        reads += 1
        length = len(rows)
        if lengths and length < lengths[-1]:
            errors.append(f"the log shrank from {lengths[-1]} to {length} events")
        if not lengths or length != lengths[-1]:
            lengths.append(length)
            print("saw", length, rows[-1].hash if rows else GENESIS_HASH, flush=True)
    return {"reads": reads, "lengths": lengths, "errors": errors}


def hold(path: Path) -> dict[str, Any]:
    with EventLog(path, readonly=True) as log_:
        rows = log_.rows()
        first = next(rows)
        print("holding", first.seq, flush=True)
        sys.stdin.readline()  # the writer appends meanwhile
        seen = [first, *rows]
    checked_rows = list(checked(seen, 0, GENESIS_HASH))
    return {"count": len(checked_rows), "last_seq": checked_rows[-1].seq, "last_hash": checked_rows[-1].hash}


def main(argv: list[str]) -> None:
    mode, path = argv[0], Path(argv[1])
    report = follow(path) if mode == "follow" else hold(path)
    print("report", json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
