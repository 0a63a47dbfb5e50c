"""The outbox: the log published in seq order, the cursor moved only by acknowledgements."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from edge_agent.gateway import _LogSource
from edge_agent.log.store import OUTBOX_CURSOR, EventLog
from edge_agent.mqtt.outbox import WINDOW, Outbox
from edge_agent.mqtt.topics import Topics
from tests.plant import make_log

TOPICS = Topics("factory", "cell-9")


class Broker:
    """Stands in for paho's publish: records what was sent; `online` False drops the link."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, dict[str, object]]] = []
        self.online = True
        self._mid = 0

    def publish(self, topic: str, payload: bytes) -> int | None:
        if not self.online:
            return None
        self._mid += 1
        self.sent.append((self._mid, topic, orjson.loads(payload)))
        return self._mid

    def seqs(self, topic: str = TOPICS.events) -> list[int]:
        return [int(str(message["seq"])) for _, t, message in self.sent if t == topic]


@pytest.fixture
def log_(tmp_path: Path) -> EventLog:
    return EventLog(make_log(tmp_path / "events.db", orders=8))


def test_every_event_goes_out_in_seq_order_with_inventory_and_rejections_beside(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(_LogSource(log_), broker.publish, TOPICS, "cell-9")
    outbox.connected()
    head = log_.head().seq
    while outbox.acked < head:
        mids = [mid for mid, _, _ in broker.sent]
        for mid in mids:
            outbox.published(mid)
    assert sorted(set(broker.seqs())) == list(range(1, head + 1))
    first_seen: list[int] = []
    for seq in broker.seqs():
        if seq not in first_seen:
            first_seen.append(seq)
    assert first_seen == list(range(1, head + 1))
    inventory = [m for _, t, m in broker.sent if t == TOPICS.inventory]
    assert [m["inventory_id"] for m in inventory] == [f"INV{n:05d}" for n in range(1, 9)]
    assert set(inventory[0]) == {
        "inventory_id",
        "order_id",
        "product_id",
        "qty",
        "warehouse",
        "device_id",
        "completed_at",
    }
    event = next(m for _, t, m in broker.sent if t == TOPICS.events)
    assert set(event) == {"device_id", "seq", "ts", "type", "subject", "data"}


def test_the_cursor_moves_only_over_a_contiguous_acknowledged_prefix_and_is_kept(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(_LogSource(log_), broker.publish, TOPICS, "cell-9")
    outbox.connected()
    assert len(set(broker.seqs())) == WINDOW  # no more in flight than the window
    by_seq = {int(str(m["seq"])): mid for mid, t, m in broker.sent if t == TOPICS.events}
    outbox.published(by_seq[3])
    outbox.published(by_seq[2])
    assert outbox.acked == 0  # seq 1 is not acknowledged yet
    outbox.published(by_seq[1])
    assert outbox.acked == 3
    outbox.save()
    assert log_.cursor(OUTBOX_CURSOR) == 3
    restarted = Outbox(_LogSource(log_), Broker().publish, TOPICS, "cell-9")
    assert restarted.acked == 3


def test_after_a_reconnect_everything_unacknowledged_is_sent_again_in_order(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(_LogSource(log_), broker.publish, TOPICS, "cell-9")
    outbox.connected()
    for mid, topic, message in list(broker.sent):
        if topic == TOPICS.events and int(str(message["seq"])) <= 10:
            outbox.published(mid)
    broker.online = False
    outbox.disconnected()
    outbox.pump()  # offline: nothing is sent
    stale = broker.sent[-1][0]
    broker.online = True
    broker.sent.clear()
    outbox.connected()
    assert broker.seqs()[0] == 11
    outbox.published(stale)  # an acknowledgement from before the reconnect changes nothing
    assert outbox.acked == 10


def test_a_publish_that_fails_stops_the_pump_until_the_next_connection(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(_LogSource(log_), broker.publish, TOPICS, "cell-9")
    broker.online = False
    outbox.connected()
    assert broker.sent == []
    broker.online = True
    outbox.pump()
    assert broker.sent == []  # still considered offline until connected() says otherwise
    outbox.connected()
    assert broker.seqs()[0] == 1
