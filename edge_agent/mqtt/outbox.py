"""The log is the outbox: events, inventory and rejections are published from it.

In seq order, at QoS 1, from a cursor that advances only when the broker has
acknowledged (PUBACK) every message of an event, and that is kept in the
database, so publishing resumes after a reconnect or a restart where it was.
Delivery is at least once: after a reconnect the unacknowledged tail is sent
again, and consumers deduplicate by (device_id, seq) or inventory_id. Nothing
is written twice (no dual writes): what is published is what was committed.

A broker may refuse a message (MQTT 5: a PUBACK with a failure code, e.g. its
ACL's 0x87 Not authorized). That is no delivery: the cursor stays before the
message's event, and the message is sent again with capped exponential backoff
until the broker takes it; `refusal` says why meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import orjson

from edge_agent.domain import events as ev
from edge_agent.errors import LogError
from edge_agent.mqtt.link import backoff_s
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
    """What the outbox reads and where it keeps its cursor: the event log, or a
    running agent's view of it."""

    def rows(self, from_seq: int = 1, to_seq: int | None = None, *, limit: int | None = None) -> Iterable[Row]: ...

    def cursor(self, name: str) -> int | None: ...

    def save_cursor(self, name: str, seq: int) -> None: ...


Publish = Callable[[str, bytes], int | None]  # (topic, payload) -> mid, or None when offline
Schedule = Callable[[float, Callable[[], None]], object]  # run a callable after so many seconds
RefusalObserver = Callable[[str | None], object]  # told the refusal when one starts, None when it ends


class _Sent(NamedTuple):
    """A message in flight, kept until the broker takes it (to send it again if refused)."""

    seq: int
    topic: str
    payload: bytes


def _call_later(delay_s: float, call: Callable[[], None]) -> object:
    return asyncio.get_running_loop().call_later(delay_s, call)


def messages(row: Row, device_id: str, topics: Topics) -> list[tuple[str, bytes]]:
    """The messages one event becomes: always its `events` message, and for an inventory
    record or a rejection also the message on that topic."""
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
    if row.type == ev.InventoryIssued.__name__:
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
    elif row.type == ev.OrderRejected.__name__:
        # The event's seq: a rejection is delivered at least once, like the event itself, so
        # a consumer deduplicates it by (device_id, seq) here too.
        rejection = {"order_id": data["order_id"], "reason": data["reason"], "received_at": row.ts, "seq": row.seq}
        out.append((topics.rejected, orjson.dumps(rejection)))
    return out


class Outbox:
    """Runs on the event loop: `pump` after every commit, `published` on every PUBACK."""

    def __init__(
        self,
        source: Source,
        publish: Publish,
        topics: Topics,
        device_id: str,
        *,
        cursor: str,
        schedule: Schedule = _call_later,
        rng: random.Random | None = None,
    ) -> None:
        """`cursor`: the name under which the source keeps how far the broker has acknowledged."""
        self._source = source
        self._cursor = cursor
        self._publish = publish
        self._topics = topics
        self._device_id = device_id
        self._schedule = schedule
        self._rng = rng or random.Random()
        self.acked = source.cursor(cursor) or 0  # every event up to here is acknowledged by the broker
        self._saved = self.acked
        self._next = self.acked + 1
        self._online = False
        self._unacked: dict[int, int] = {}  # seq -> messages of it not yet acknowledged
        self._mids: dict[int, _Sent] = {}  # mid -> the message
        self.refusal: str | None = None  # why the broker refuses a message now (None: it does not)
        self._observers: list[RefusalObserver] = []
        self._refused_upto = 0  # the latest event with a refused message in this episode
        self._attempt = 0  # retries in this episode, for the backoff
        self._retry: list[_Sent] = []  # refused messages waiting for their retry
        self._retry_scheduled = False

    def add_observer(self, observer: RefusalObserver) -> None:
        """Tell `observer` when the broker starts refusing a message (why) and when it stops (None)."""
        self._observers.append(observer)

    def remove_observer(self, observer: RefusalObserver) -> None:
        self._observers.remove(observer)

    def connected(self) -> None:
        """(Re)connected: send again everything not acknowledged, in order."""
        self._online = True
        self._next = self.acked + 1
        self._unacked.clear()
        self._mids.clear()
        self._retry.clear()  # sent again from the cursor now
        self.pump()

    def disconnected(self) -> None:
        self._online = False

    def pump(self) -> None:
        """Publish committed events, in seq order, while fewer than WINDOW are in flight."""
        while self._online and len(self._unacked) < WINDOW:
            rows = list(self._source.rows(self._next, limit=WINDOW - len(self._unacked)))
            if not rows:
                return
            for row in rows:
                for topic, payload in messages(row, self._device_id, self._topics):
                    if not self._send(_Sent(row.seq, topic, payload)):
                        return
                    self._unacked[row.seq] = self._unacked.get(row.seq, 0) + 1
                self._next = row.seq + 1

    def _send(self, message: _Sent) -> bool:
        mid = self._publish(message.topic, message.payload)
        if mid is None:  # the connection dropped: resume from the cursor on reconnect
            self._online = False
            return False
        self._mids[mid] = message
        return True

    def published(self, mid: int, refusal: str | None = None) -> None:
        """The broker answered message `mid`: took it (`refusal` None), or refused it, saying why."""
        message = self._mids.pop(mid, None)
        if message is None:
            return  # from before a reconnect: its event is being sent again anyway
        if refusal is not None:
            self._refused(message, refusal)
            return
        seq = message.seq
        left = self._unacked[seq] - 1
        if left:
            self._unacked[seq] = left
        else:
            del self._unacked[seq]
        self.acked = (min(self._unacked) if self._unacked else self._next) - 1
        if self.refusal is not None and self.acked >= self._refused_upto:
            self._taken_again()
        self.pump()

    def _refused(self, message: _Sent, refusal: str) -> None:
        """Not delivered: its event stays unacknowledged, and it is sent again after a backoff."""
        self._refused_upto = max(self._refused_upto, message.seq)
        if self.refusal is None:  # one line per episode, not one per retry
            self.refusal = f"the broker refuses messages on {message.topic}: {refusal}"
            log.error("%s; not delivered: the outbox stays before event %d and retries", self.refusal, message.seq)
            for observer in tuple(self._observers):
                observer(self.refusal)
        self._retry.append(message)
        if not self._retry_scheduled:
            self._retry_scheduled = True
            self._schedule(backoff_s(self._attempt, self._rng), self._send_refused)
            self._attempt += 1

    def _send_refused(self) -> None:
        self._retry_scheduled = False
        waiting, self._retry = self._retry, []
        if self._online:  # else the next connection sends them again from the cursor
            for message in waiting:
                if not self._send(message):
                    return

    def _taken_again(self) -> None:
        log.warning("the broker takes every message again; delivered up to event %d", self.acked)
        self.refusal = None
        self._refused_upto = self._attempt = 0
        for observer in tuple(self._observers):
            observer(None)

    def save(self) -> None:
        """Persist the cursor (called now and then, and on stop)."""
        if self.acked != self._saved:
            try:
                self._source.save_cursor(self._cursor, self.acked)
            except LogError as error:
                # Only a bookmark: unsaved, a restart sends a few events again (at least
                # once, as the contract says). The agent deals with the storage fault itself.
                log.warning("the outbox cursor is not saved, tried again later: %s", error)
                return
            self._saved = self.acked
