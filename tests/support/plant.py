"""Drive the cell through realistic order lifecycles: a bare state, for the pure tests, or a
journal, for tests that need a log."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.clock import FakeClock
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.decide import admit, decide
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.log.journal import Journal
from edge_agent.log.store import OUTBOX_CURSOR
from tests.support.orders import order

STATIONS = ("s1", "s2", "s3")
PRODUCTS = (("widget-a", 100), ("gadget-b", 100))
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # when the pure tests decide, unless they say otherwise


def record(state: State, events: list[ev.Event], at: datetime = T0) -> list[ev.Recorded]:
    """`events` as the log would record them after `state`, at `at`."""
    ts = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return [ev.Recorded(state.last_seq + i, ts, event) for i, event in enumerate(events, start=1)]


def apply(state: State, command: cmd.Command, at: datetime = T0) -> tuple[State, list[ev.Recorded]]:
    """Decide `command` on `state` at `at`; the state after its events, and the events."""
    records = record(state, decide(state, command, at), at)
    return fold(state, records), records


def run(journal: Journal, command: cmd.Command, clock: FakeClock | None = None) -> list[ev.Recorded]:
    """Decide `command` on the journal's state (an order against its idempotency record)
    and commit the result."""
    if isinstance(command, cmd.SubmitOrder):
        known = journal.known_orders([command.order_id]).get(command.order_id)
        return journal.append(admit(command, known, open_items=len(journal.state.work_items), max_open=None))
    now = clock.now() if clock else FakeClock().now()
    return journal.append(decide(journal.state, command, now))


def produce(journal: Journal, orders: int, *, qty: int = 2, clock: FakeClock | None = None, prefix: str = "o") -> None:
    """Accept `orders` orders and run the cell until every one has shipped and is tidied up."""
    run(journal, cmd.ConfigurePlant(STATIONS, PRODUCTS), clock)
    for i in range(orders):
        order_id = f"{prefix}{i}"
        run(journal, order(order_id, qty, priority=i % 3), clock)
        run(journal, cmd.QueueOrder(order_id), clock)
    while journal.state.work_items:
        if clock:
            clock.advance(1.0)
        run(journal, cmd.AssignStations(), clock)
        for station in STATIONS:
            run(journal, cmd.RecordUnit(station), clock)
        run(journal, cmd.StartShipment(), clock)
        for recorded in run(journal, cmd.RecordArrival(), clock):
            if isinstance(recorded.event, ev.InventoryIssued):
                run(journal, cmd.TidyUp(recorded.event.order_id), clock)


def make_log(path: Path, orders: int = 10, *, snapshot_every: int = 10, qty: int = 2, published: bool = True) -> Path:
    """A closed log file at `path` holding `orders` complete lifecycles; `published`: every
    event of them acknowledged by the broker (the outbox's cursor at the head), else none."""
    clock = FakeClock()
    with Journal.open(path, snapshot_every=snapshot_every, clock=clock) as journal:
        produce(journal, orders, qty=qty, clock=clock)
        if published:
            journal.log.save_cursor(OUTBOX_CURSOR, journal.state.last_seq)
    return path


def damage_newest_event(path: Path) -> None:
    """Flip a byte of the newest event's data on disk, as a bad card or an edit would."""
    with closing(sqlite3.connect(path)) as conn, conn:
        seq, data = conn.execute("SELECT seq, data FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        conn.execute("UPDATE events SET data = ? WHERE seq = ?", (data.replace('"', "'", 1), seq))
