"""A writer for the crash test: appends real order lifecycles until it is killed.

Run as `python -m tests.support.crash_writer PATH SEED` from the project root. It opens
the journal at PATH (synchronous=full, a snapshot every few events), prints
`ready SEQ DIGEST` with the state it recovered, then drives the cell forever,
printing `FIRST LAST` (flushed) after every append has committed. A line on
stdout is therefore an acknowledgement: its events must survive any kill.
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path
from typing import Any

import orjson

from edge_agent.domain import commands as cmd
from edge_agent.domain.codec import state_to_dict
from edge_agent.domain.state import CANCELLABLE_STAGES, FINISHED_STAGES, Stage, State
from edge_agent.log.journal import Journal
from tests.support.orders import order
from tests.support.plant import PRODUCTS, STATIONS, run

SNAPSHOT_EVERY = 25
LIVE_ORDERS = 6  # work items kept alive (new orders top the cell up to this)


def canonical(state: State) -> dict[str, Any]:
    """`state_to_dict` with the work items in a fixed order.

    The order of an `immutables.Map` follows the hashes of its keys, which vary
    between processes, so states from two processes are compared in this form."""
    data = state_to_dict(state)
    data["work_items"] = sorted(data["work_items"], key=lambda item: str(item[0]))
    return data


def digest(state: State) -> str:
    """A fingerprint of the whole state that two processes can compare."""
    return hashlib.sha256(orjson.dumps(canonical(state), option=orjson.OPT_SORT_KEYS)).hexdigest()


def commit(journal: Journal, command: cmd.Command) -> None:
    """Run `command`; once its events have committed, acknowledge them on stdout."""
    records = run(journal, command)
    if records:
        print(records[0].seq, records[-1].seq, flush=True)


def cycle(journal: Journal, rng: random.Random) -> None:
    """One turn of the cell, from whatever state the log was left in."""
    commit(journal, cmd.ConfigurePlant(STATIONS, PRODUCTS))
    if journal.state.estop:
        commit(journal, cmd.ReleaseEstop())
    for _ in range(LIVE_ORDERS - len(journal.state.work_items)):
        order_id = f"c{journal.state.accepted}"  # every accepted order adds one: ids never repeat
        qty, priority = rng.randint(1, 3), rng.randint(0, 2)
        commit(journal, order(order_id, qty, priority=priority))
    if rng.random() < 0.1:  # a conflicting duplicate of an order already seen
        known = "c0" if journal.state.accepted else None
        if known is not None:
            commit(journal, order(known, product="widget-b"))
    for item in list(journal.state.work_items.values()):
        if item.stage is Stage.NEW:
            commit(journal, cmd.QueueOrder(item.order_id))
    if rng.random() < 0.05:
        cancellable = [i.order_id for i in journal.state.work_items.values() if i.stage in CANCELLABLE_STAGES]
        if cancellable:
            commit(journal, cmd.CancelOrder(rng.choice(cancellable)))
    commit(journal, cmd.AssignStations())  # one event per idle station
    for station in STATIONS:
        commit(journal, cmd.RecordUnit(station))  # UnitBuilt, with BuildComplete after the last unit
    commit(journal, cmd.StartShipment())
    commit(journal, cmd.RecordArrival())  # ShipmentArrived + InventoryIssued in one transaction
    for item in list(journal.state.work_items.values()):
        if item.stage in FINISHED_STAGES:
            commit(journal, cmd.TidyUp(item.order_id))
    if rng.random() < 0.05:
        commit(journal, cmd.EngageEstop())


def main(argv: list[str]) -> None:
    path, seed = Path(argv[0]), int(argv[1])
    rng = random.Random(seed)
    with Journal.open(path, synchronous="full", snapshot_every=SNAPSHOT_EVERY) as journal:
        print("ready", journal.state.last_seq, digest(journal.state), flush=True)
        while True:
            cycle(journal, rng)


if __name__ == "__main__":
    main(sys.argv[1:])
