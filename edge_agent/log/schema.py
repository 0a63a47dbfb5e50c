"""The log's schema as named migrations, each applied once and recorded.

Append new migrations at the end; never edit one that has shipped.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[tuple[str, str], ...] = (
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
)


def migrate(db: sqlite3.Connection, now: str) -> list[str]:
    """Apply the migrations not yet recorded in `db` (at time `now`); return their names."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = {name for (name,) in db.execute("SELECT name FROM schema_migrations")}
    applied = []
    for name, sql in MIGRATIONS:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(sql)
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
