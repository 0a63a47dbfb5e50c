"""The link's read-ahead socket: paho's small reads served from one recv, on real sockets.

paho reads a packet's header a byte at a time and asks `pending()` before it selects;
whatever the read-ahead holds must come out exactly once, in order, and a socket with
nothing buffered must look to paho like the plain socket it wraps.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.mqtt.link import _Client, _ReadAhead
from tests.brokers import Mosquitto


@pytest.fixture
def pair() -> Iterator[tuple[_ReadAhead, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reader = _ReadAhead(ours)
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
    reader = _ReadAhead(ours)
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


def test_pending_counts_what_was_read_ahead(pair: tuple[_ReadAhead, socket.socket]) -> None:
    reader, theirs = pair
    theirs.sendall(b"\x30\x05hello")
    assert reader.recv(1) == b"\x30"
    assert reader.pending() == 6  # the rest came with the first read: paho must not select for it
    assert reader.recv(1) == b"\x05"
    assert reader.recv(5) == b"hello"
    assert reader.pending() == 0


def test_nothing_arrived_and_peer_closed_look_like_the_plain_socket(pair: tuple[_ReadAhead, socket.socket]) -> None:
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

    subscriber = _Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
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
        assert isinstance(subscriber.socket(), _ReadAhead)
        for n in range(count):
            publisher.publish("burst", payload + str(n).encode(), qos=1)
        assert done.wait(30), f"{len(received)} of {count} messages arrived"
        assert received == [payload + str(n).encode() for n in range(count)]
    finally:
        publisher.loop_stop()
        subscriber.loop_stop()
        publisher.disconnect()
        subscriber.disconnect()
