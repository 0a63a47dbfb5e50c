"""The link's read-ahead socket: paho's small reads served from one recv, on real sockets.

paho reads a packet's header a byte at a time and asks `pending()` before it selects;
whatever the read-ahead holds must come out exactly once, in order, and a socket with
nothing buffered must look to paho like the plain socket it wraps.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.config import MqttConfig
from edge_agent.mqtt.link import Inbound, Link, ReadAhead, ReadAheadClient
from edge_agent.mqtt.topics import Topics
from tests.support import WAIT_S
from tests.support.brokers import Mosquitto


@pytest.fixture
def pair() -> Iterator[tuple[ReadAhead, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = ReadAhead(ours)
    yield reader, theirs
    reader.close()
    theirs.close()


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20),
    sizes=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=50),
)
def test_reads_return_the_stream_exactly_once_in_order(pieces: list[bytes], sizes: list[int]) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = ReadAhead(ours)
    try:
        sent = b"".join(pieces)
        for piece in pieces:
            theirs.sendall(piece)
        received = b""
        turn = 0
        while len(received) < len(sent):
            size = sizes[turn % len(sizes)]
            turn += 1
            chunk = reader.recv(size)
            assert 0 < len(chunk) <= size
            received += chunk
            assert reader.pending() >= 0
        assert received == sent
        assert reader.pending() == 0
    finally:
        reader.close()
        theirs.close()


def test_pending_counts_what_was_read_ahead(pair: tuple[ReadAhead, socket.socket]) -> None:
    reader, theirs = pair
    theirs.sendall(b"\x30\x05hello")
    assert reader.recv(1) == b"\x30"
    assert reader.pending() == 6  # the rest came with the first read: paho must not select for it
    assert reader.recv(1) == b"\x05"
    assert reader.recv(5) == b"hello"
    assert reader.pending() == 0


def test_nothing_arrived_and_peer_closed_look_like_the_plain_socket(pair: tuple[ReadAhead, socket.socket]) -> None:
    reader, theirs = pair
    with pytest.raises(BlockingIOError):  # paho's "try again after select"
        reader.recv(1)
    theirs.sendall(b"ab")
    theirs.close()
    assert reader.recv(10) == b"ab"
    assert reader.recv(1) == b""  # the end of the stream: paho's "connection lost"


def test_a_plain_tcp_connection_is_read_ahead_and_carries_a_burst(mosquitto_broker: Mosquitto) -> None:
    """A burst of QoS 1 messages larger than one read comes through the wrapped socket whole."""
    count, payload = 500, b"x" * 400
    received: list[bytes] = []
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received.append(bytes(message.payload))
        if len(received) == count:
            done.set()

    subscriber = ReadAheadClient(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect("127.0.0.1", mosquitto_broker.port)
    subscriber.subscribe("burst", qos=1)
    subscriber.loop_start()
    publisher = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    publisher.connect("127.0.0.1", mosquitto_broker.port)
    publisher.loop_start()
    try:
        assert subscribed.wait(10)
        assert isinstance(subscriber.socket(), ReadAhead)
        for n in range(count):
            publisher.publish("burst", payload + str(n).encode(), qos=1)
        assert done.wait(30), f"{len(received)} of {count} messages arrived"
        assert received == [payload + str(n).encode() for n in range(count)]
    finally:
        publisher.loop_stop()
        subscriber.loop_stop()
        publisher.disconnect()
        subscriber.disconnect()


class Received:
    """What a Link hands over, from paho's thread, for the test's thread to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.messages: list[Inbound] = []
        self.connections = 0
        self.published: list[int] = []

    def message(self, message: Inbound) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def connection(self, up: bool) -> None:
        with self._cond:
            self.connections += up
            self._cond.notify_all()

    def answer(self, mid: int, refusal: str | None) -> None:
        with self._cond:
            self.published.append(mid)
            self._cond.notify_all()

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        with self._cond:
            assert self._cond.wait_for(condition, timeout), f"not within {timeout} s: {what}"

    def arrived(self, payload: bytes, times: int = 1) -> Callable[[], bool]:
        return lambda: sum(m.payload == payload for m in self.messages) >= times


def test_an_order_from_an_earlier_connection_is_not_acknowledged_on_a_later_one(mosquitto_broker: Mosquitto) -> None:
    """An order received on one connection and committed after a reconnect: its packet id may
    name another order on the new connection, so acknowledging it there would acknowledge
    that one, uncommitted. The link does not; that other order stays the broker's to send
    again."""
    broker = mosquitto_broker
    topics = Topics("factory", "ack-test")
    seen = Received()
    link = Link(
        MqttConfig(port=broker.port, protocol="5"),
        "ack-test",
        topics,
        will=b"{}",
        on_message=seen.message,
        on_connection=seen.connection,
        on_published=seen.answer,
    )
    senders: list[paho.Client] = []

    def send(payload: bytes, qos: int = 1) -> None:
        """From a client of the test's own, connected to the broker as it is now."""
        if not senders or not senders[-1].is_connected():
            sender = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
            sender.connect("127.0.0.1", broker.port)
            sender.loop_start()
            senders.append(sender)
        senders[-1].publish(topics.device_orders, payload, qos=qos).wait_for_publish(20)

    def subscribed_again(times: int) -> None:
        """Until the link's subscription works on its `times`th connection (probes at QoS 0)."""
        seen.wait(lambda: seen.connections == times, f"connection {times}")
        for n in itertools.count():
            send(b"probe %d" % n, qos=0)
            with suppress(AssertionError):
                seen.wait(seen.arrived(b"probe %d" % n), "the probe", 0.2)
                return

    link.start()
    try:
        subscribed_again(1)
        send(b"first")
        seen.wait(seen.arrived(b"first"), "the first order")
        [first] = [m for m in seen.messages if m.payload == b"first"]

        broker.kill()  # and its session with it: the next connection starts afresh
        (broker.folder / "mosquitto.db").unlink(missing_ok=True)
        broker.start()
        subscribed_again(2)
        send(b"second")
        seen.wait(seen.arrived(b"second"), "the second order")
        [second] = [m for m in seen.messages if m.payload == b"second"]
        assert (first.mid, first.connection) == (second.mid, second.connection - 1)  # the same id, named again

        link.ack(first)  # committed only now, after the reconnect
        flush = link.publish("factory/ack-test/flush", b"")  # after anything the ack sent, on the same connection
        seen.wait(lambda: flush in seen.published, "the broker's answer to the flush")

        broker.stop()  # an orderly stop: the session, with anything unacknowledged, is kept
        broker.start()
        seen.wait(lambda: seen.connections == 3, "connection 3")
        seen.wait(seen.arrived(b"second", times=2), "the second order sent again")
    finally:
        link.stop()
        for sender in senders:
            sender.loop_stop()
            sender.disconnect()
