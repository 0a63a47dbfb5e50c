"""The log is the outbox: events, inventory and rejections are published from it.

In seq order, at QoS 1, from a cursor that advances only when the broker has
acknowledged (PUBACK) every message of an event, and that is kept in the
database, so publishing resumes after a reconnect or a restart where it was.
Delivery is at least once: after a reconnect the unacknowledged tail is sent
again, and consumers deduplicate by (device_id, seq) or inventory_id. Nothing
is written twice (no dual writes): what is published is what was committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson

from edge_agent.errors import LogError
from edge_agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

WINDOW = 100  # events in flight at most


class Row(Protocol):
    """A stored event (the log's row)."""

    @property
    def seq(self) -> int: ...

    @property
    def ts(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> str: ...


class Source(Protocol):
    """What the outbox reads and where it keeps its cursor (the event log)."""

    def rows_from(self, seq: int, limit: int) -> Sequence[Row]: ...

    def load_cursor(self) -> int: ...

    def save_cursor(self, seq: int) -> None: ...


Publish = Callable[[str, bytes], int | None]  # (topic, payload) -> mid, or None when offline


def messages(row: Row, device_id: str, topics: Topics) -> list[tuple[str, bytes]]:
    """The messages one event becomes (SPEC §5)."""
    data = orjson.loads(row.data)
    out = [
        (
            topics.events,
            orjson.dumps(
                {
                    "device_id": device_id,
                    "seq": row.seq,
                    "ts": row.ts,
                    "type": row.type,
                    "subject": row.subject,
                    "data": data,
                }
            ),
        )
    ]
    if row.type == "InventoryIssued":
        record = {
            "inventory_id": data["inventory_id"],
            "order_id": data["order_id"],
            "product_id": data["product_id"],
            "qty": data["qty"],
            "warehouse": data["warehouse"],
            "device_id": device_id,
            "completed_at": row.ts,
        }
        out.append((topics.inventory, orjson.dumps(record)))
    elif row.type == "OrderRejected":
        out.append(
            (
                topics.rejected,
                orjson.dumps({"order_id": data["order_id"], "reason": data["reason"], "received_at": row.ts}),
            )
        )
    return out


class Outbox:
    """Runs on the event loop: `pump` after every commit, `published` on every PUBACK."""

    def __init__(self, source: Source, publish: Publish, topics: Topics, device_id: str) -> None:
        self._source = source
        self._publish = publish
        self._topics = topics
        self._device_id = device_id
        self.acked = source.load_cursor()  # every event up to here is acknowledged by the broker
        self._saved = self.acked
        self._next = self.acked + 1
        self._online = False
        self._unacked: dict[int, int] = {}  # seq -> messages of it not yet acknowledged
        self._mids: dict[int, int] = {}  # mid -> seq

    def connected(self) -> None:
        """(Re)connected: send again everything not acknowledged, in order."""
        self._online = True
        self._next = self.acked + 1
        self._unacked.clear()
        self._mids.clear()
        self.pump()

    def disconnected(self) -> None:
        self._online = False

    def pump(self) -> None:
        """Publish committed events, in seq order, while fewer than WINDOW are in flight."""
        while self._online and len(self._unacked) < WINDOW:
            rows = self._source.rows_from(self._next, WINDOW - len(self._unacked))
            if not rows:
                return
            for row in rows:
                for topic, payload in messages(row, self._device_id, self._topics):
                    mid = self._publish(topic, payload)
                    if mid is None:  # the connection dropped: resume from the cursor on reconnect
                        self._online = False
                        return
                    self._mids[mid] = row.seq
                    self._unacked[row.seq] = self._unacked.get(row.seq, 0) + 1
                self._next = row.seq + 1

    def published(self, mid: int) -> None:
        """The broker acknowledged message `mid`."""
        seq = self._mids.pop(mid, None)
        if seq is None:
            return  # from before a reconnect: its event is being sent again anyway
        left = self._unacked[seq] - 1
        if left:
            self._unacked[seq] = left
        else:
            del self._unacked[seq]
        self.acked = (min(self._unacked) if self._unacked else self._next) - 1
        self.pump()

    def save(self) -> None:
        """Persist the cursor (called now and then, and on stop)."""
        if self.acked != self._saved:
            try:
                self._source.save_cursor(self.acked)
            except LogError as error:
                # Only a bookmark: unsaved, a restart sends a few events again (at least
                # once, as the contract says). The agent deals with the storage fault itself.
                log.warning("the outbox cursor is not saved, tried again later: %s", error)
                return
            self._saved = self.acked
