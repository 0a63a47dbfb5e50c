"""A paho-based MQTT peer for tests: the back office publishing orders and watching topics.

It subscribes first (waiting for the SUBACK), then collects every message it
receives, in arrival order, behind a condition variable; tests wait for a
message matching a predicate with a timeout, never by sleeping.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from tests.support import WAIT_S


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        return orjson.loads(self.payload)


Predicate = Callable[[Message], bool]


def on(topic: str, **fields: object) -> Predicate:
    """A message on `topic` whose JSON object has these field values."""

    def matches(message: Message) -> bool:
        if message.topic != topic:
            return False
        if not fields:
            return True
        value = message.json()
        return isinstance(value, dict) and all(value.get(key) == want for key, want in fields.items())

    return matches


class Peer:
    """One connected client; every message received is kept, in order."""

    def __init__(self, port: int, protocol: str, name: str = "peer") -> None:
        self.port = port
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{name}-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5 if protocol == "5" else MQTTProtocolVersion.MQTTv311,
        )
        self._changed = threading.Condition()
        self._messages: list[Message] = []
        self._connected: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- paho's thread -------------------------------------------------------------

    def _on_connect(self, c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        with self._changed:
            self._connected = reason
            self._changed.notify_all()

    def _on_subscribe(self, c: paho.Client, u: object, mid: int, reasons: list[ReasonCode], p: object) -> None:
        with self._changed:
            self._subacks[mid] = reasons
            self._changed.notify_all()

    def _on_message(self, c: paho.Client, u: object, message: paho.MQTTMessage) -> None:
        received = Message(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        with self._changed:
            self._messages.append(received)
            self._changed.notify_all()

    # -- the test's thread -----------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, timeout):
                raise AssertionError(f"{what}: nothing within {timeout:g} s")

    def connect(self, timeout: float = WAIT_S) -> None:
        self._client.connect("127.0.0.1", self.port, keepalive=30)
        self._client.loop_start()
        self._wait(lambda: self._connected is not None, timeout, "CONNACK")
        assert self._connected is not None
        assert not self._connected.is_failure, f"the broker refused the test peer: {self._connected}"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, *topics: str, qos: int = 1, timeout: float = WAIT_S) -> None:
        """Subscribe and wait for the SUBACK: messages published after this returns are seen."""
        _, mid = self._client.subscribe([(topic, qos) for topic in topics])
        assert mid is not None, "not connected"
        self._wait(lambda: mid in self._subacks, timeout, f"SUBACK for {topics}")
        failed = [reason for reason in self._subacks[mid] if reason.is_failure]
        assert not failed, f"subscription to {topics} refused: {failed}"

    def publish(self, topic: str, payload: bytes | dict[str, Any], qos: int = 1, timeout: float = WAIT_S) -> None:
        """Publish; at QoS 1, wait for the broker's PUBACK."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        info = self._client.publish(topic, body, qos=qos)
        if qos > 0:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"no PUBACK for {topic} within {timeout:g} s"

    def mark(self) -> int:
        """The position after the last message received so far (for `wait_for(since=...)`)."""
        with self._changed:
            return len(self._messages)

    def messages(self, topic: str | None = None) -> list[Message]:
        with self._changed:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_for(self, predicate: Predicate, *, since: int = 0, timeout: float = WAIT_S) -> Message:
        """The first message from position `since` on that matches, waiting for it if need be."""
        deadline = time.monotonic() + timeout
        position = since
        with self._changed:
            while True:
                while position < len(self._messages):
                    message = self._messages[position]
                    position += 1
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = [(m.topic, m.payload[:200]) for m in self._messages[-8:]]
                    raise AssertionError(f"no matching message within {timeout:g} s; last received: {tail}")
                self._changed.wait(left)


@contextmanager
def peer(port: int, protocol: str, *topics: str, name: str = "peer") -> Iterator[Peer]:
    """A connected peer, subscribed (SUBACK received) to `topics` at QoS 1."""
    client = Peer(port, protocol, name)
    client.connect()
    try:
        if topics:
            client.subscribe(*topics)
        yield client
    finally:
        client.close()
