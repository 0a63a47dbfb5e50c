"""The log's schema as named migrations, each applied once and recorded.

Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from hashlib import sha256

import orjson

from edge_agent.domain import events as ev
from edge_agent.domain.commands import order_digest

# A migration is SQL, or a function for one that must read what is stored (a backfill).
Migration = str | Callable[[sqlite3.Connection], None]

# Outcomes of an order in the idempotency record, by event type (an InventoryIssued
# records the inventory id itself).
FAILED = "Failed"
CANCELLED = "Cancelled"
OUTCOME_EVENTS = (ev.InventoryIssued.__name__, ev.OrderFailed.__name__, ev.OrderCancelled.__name__)


def _orders(db: sqlite3.Connection) -> None:
    """The idempotency record: every order id ever accepted, its body's digest and how it
    ended, indexed by id and written in the same transaction as the events. Filled from the
    stored events and from the newest snapshot, which in a compacted log is the only place
    the ids of the compacted orders are (as its `orders` map, from before this table)."""
    db.execute(
        """
        CREATE TABLE orders (
            order_id     TEXT PRIMARY KEY,
            digest       TEXT NOT NULL,     -- of the order's body: a redelivery has the same
            accepted_seq INTEGER NOT NULL,  -- its OrderAccepted; 0 if compacted away before it was recorded here
            outcome      TEXT,              -- the inventory id, Failed or Cancelled; NULL while live
            outcome_seq  INTEGER
        )
        """
    )
    for order_id, digest in _snapshot_orders(db):
        db.execute("INSERT INTO orders (order_id, digest, accepted_seq) VALUES (?, ?, 0)", (order_id, digest))
    rows = db.execute(
        "SELECT seq, type, subject, data FROM events WHERE type IN (?, ?, ?, ?) ORDER BY seq",
        (ev.OrderAccepted.__name__, *OUTCOME_EVENTS),
    )
    for seq, type_, subject, data in rows:
        fields = orjson.loads(data)
        if type_ == ev.OrderAccepted.__name__:
            # The digest from the body itself: demo orders were once given a digest of their
            # own, which would make the same order resent over MQTT a conflict.
            digest = order_digest(subject, fields["product_id"], fields["qty"], fields["warehouse"], fields["priority"])
            db.execute(
                "INSERT OR REPLACE INTO orders (order_id, digest, accepted_seq) VALUES (?, ?, ?)",
                (subject, digest, seq),
            )
        else:
            db.execute(
                "UPDATE orders SET outcome = ?, outcome_seq = ? WHERE order_id = ?",
                (outcome(type_, fields.get("inventory_id")), seq, subject),
            )


def outcome(type_: str, inventory_id: str | None) -> str:
    """How an order ended, as the idempotency record keeps it."""
    if type_ == ev.InventoryIssued.__name__ and inventory_id is not None:
        return inventory_id
    return FAILED if type_ == ev.OrderFailed.__name__ else CANCELLED


def _snapshot_orders(db: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    """(order id, digest) of the newest intact snapshot's `orders` map, if it has one."""
    for text, checksum in db.execute("SELECT state, checksum FROM snapshots ORDER BY seq DESC"):
        if sha256(text.encode()).hexdigest() != checksum:
            continue  # damaged: an older one still knows the ids
        for order_id, digest in orjson.loads(text).get("orders", {}).items():
            yield order_id, _upcast_digest(order_id, digest)
        return


def _upcast_digest(order_id: str, digest: str) -> str:
    """Demo orders' digests were once `product|qty|warehouse|priority`: today's digest of that body."""
    parts = digest.split("|")
    if len(parts) == 4 and parts[1].isdigit() and parts[3].lstrip("-").isdigit():
        return order_digest(order_id, parts[0], int(parts[1]), parts[2], int(parts[3]))
    return digest


MIGRATIONS: tuple[tuple[str, Migration], ...] = (
    (
        "0001_events",
        """
        CREATE TABLE events (
            seq     INTEGER PRIMARY KEY,  -- 1, 2, 3 ... without gaps
            ts      TEXT NOT NULL,        -- UTC, ISO 8601
            type    TEXT NOT NULL,
            subject TEXT NOT NULL,        -- the order id, station or lane concerned
            data    TEXT NOT NULL,        -- JSON
            hash    TEXT NOT NULL         -- sha256 chaining this event to the previous one
        )
        """,
    ),
    (
        "0002_snapshots",
        """
        CREATE TABLE snapshots (
            seq        INTEGER PRIMARY KEY,  -- the state after this event
            ts         TEXT NOT NULL,
            state      TEXT NOT NULL,        -- JSON
            event_hash TEXT NOT NULL,        -- hash of event `seq`: the chain continues from it
            checksum   TEXT NOT NULL         -- sha256 of `state`
        )
        """,
    ),
    (
        "0003_log_base",
        """
        CREATE TABLE log_base (  -- where the log starts once older events are compacted away
            id      INTEGER PRIMARY KEY CHECK (id = 1),
            seq     INTEGER NOT NULL,
            hash    TEXT NOT NULL,
            archive TEXT
        )
        """,
    ),
    (
        "0004_cursors",
        """
        CREATE TABLE cursors (  -- how far a consumer of the log has got (the MQTT outbox)
            name TEXT PRIMARY KEY,
            seq  INTEGER NOT NULL
        )
        """,
    ),
    ("0005_orders", _orders),
    (
        "0006_writers",
        """
        CREATE TABLE writers (  -- every release whose agent wrote to this log, with the formats it writes
            release  TEXT PRIMARY KEY,  -- edge_agent.__version__
            formats  TEXT NOT NULL,     -- JSON: event payload versions, snapshot format, workflow version
            first_at TEXT NOT NULL,
            last_at  TEXT NOT NULL
        )
        """,
    ),
)


def migrate(db: sqlite3.Connection, now: str) -> list[str]:
    """Apply the migrations not yet recorded in `db` (at time `now`); return their names."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {name for (name,) in db.execute("SELECT name FROM schema_migrations")}
    applied = []
    for name, migration in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            if isinstance(migration, str):
                db.execute(migration)
            else:
                migration(db)
            db.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                (name, now),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
