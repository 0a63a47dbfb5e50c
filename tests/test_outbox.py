"""The outbox: the log published in seq order, the cursor moved only by acknowledgements."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from edge_agent.log.store import OUTBOX_CURSOR, EventLog
from edge_agent.mqtt.outbox import WINDOW, Outbox
from edge_agent.mqtt.topics import Topics
from tests.support.plant import make_log

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
    return EventLog(make_log(tmp_path / "events.db", orders=8, published=False))


def test_every_event_goes_out_in_seq_order_with_inventory_and_rejections_beside(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(log_, broker.publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR)
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
    outbox = Outbox(log_, broker.publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR)
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
    restarted = Outbox(log_, Broker().publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR)
    assert restarted.acked == 3


def test_after_a_reconnect_everything_unacknowledged_is_sent_again_in_order(log_: EventLog) -> None:
    broker = Broker()
    outbox = Outbox(log_, broker.publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR)
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
    outbox = Outbox(log_, broker.publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR)
    broker.online = False
    outbox.connected()
    assert broker.sent == []
    broker.online = True
    outbox.pump()
    assert broker.sent == []  # still considered offline until connected() says otherwise
    outbox.connected()
    assert broker.seqs()[0] == 1


class Timers:
    """Stands in for the event loop's call_later: keeps what is due, runs it on demand."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._due: list[Callable[[], None]] = []

    def schedule(self, delay_s: float, call: Callable[[], None]) -> None:
        self.delays.append(delay_s)
        self._due.append(call)

    def run_due(self) -> None:
        due, self._due = self._due, []
        for call in due:
            call()


def test_a_refused_message_is_not_a_delivery_and_is_sent_again_with_backoff(
    log_: EventLog, caplog: pytest.LogCaptureFixture
) -> None:
    broker, timers = Broker(), Timers()
    outbox = Outbox(log_, broker.publish, TOPICS, "cell-9", cursor=OUTBOX_CURSOR, schedule=timers.schedule)
    told: list[str | None] = []
    outbox.add_observer(told.append)
    outbox.connected()
    first = broker.sent[0][0]
    outbox.published(first, "Not authorized (0x87)")
    for mid, _, _ in broker.sent[1:]:
        outbox.published(mid)
    assert outbox.acked == 0  # seq 1 was refused: nothing after it counts as delivered
    assert outbox.refusal == f"the broker refuses messages on {TOPICS.events}: Not authorized (0x87)"
    assert told == [outbox.refusal]

    for _ in range(5):  # refused again and again: retried each time, later and later
        resent = len(broker.sent)
        timers.run_due()
        assert [(topic, m["seq"]) for _, topic, m in broker.sent[resent:]] == [(TOPICS.events, 1)]
        outbox.published(broker.sent[-1][0], "Not authorized (0x87)")
        assert outbox.acked == 0
    assert timers.delays == sorted(timers.delays)
    assert timers.delays[-1] > timers.delays[0] * 2
    refusals = [r for r in caplog.records if "refuses" in r.getMessage()]
    assert len(refusals) == 1  # one line for the episode, not one per retry
    assert "cell-9/events" in refusals[0].getMessage()

    timers.run_due()
    outbox.published(broker.sent[-1][0])  # taken at last
    assert outbox.acked > 1
    assert outbox.refusal is None
    assert told == [told[0], None]
