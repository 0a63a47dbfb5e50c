"""A paho-based MQTT peer for tests: the back office publishing orders and watching topics.

It subscribes first (waiting for the SUBACK), then collects every message it
receives, in arrival order, behind a condition variable; tests wait for a
message matching a predicate with a timeout, never by sleeping. It reconnects by
itself (every second) and subscribes again on every connect, and it publishes at
QoS 1 until the broker acknowledges: it keeps working while a test kills the broker.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support import WAIT_S

PREFIX = "factory"  # the agent's default topic prefix
RESEND_S = 2.0  # a publisher sends a message again when no PUBACK came within this


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


def status_topic(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/status"


class Peer:
    """One client of the test's own; every message received is kept, in order. Connected
    (and subscribed to `topics`) by `connect()` or by entering it as a context manager."""

    def __init__(
        self,
        port: int,
        client_id: str,
        topics: Sequence[str] = (),
        *,
        protocol: str = "5",
        persistent: bool = False,
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port
        self._client_id = client_id
        self._topics = list(topics)
        self._persistent = persistent
        self._v5 = protocol == "5"
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._connected = False
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._resubscribed: int | None = None  # the mid of the subscription made on the last connect
        self._acked: set[int] = set()
        self._messages: list[Message] = []
        self.delivered = 0  # messages the broker has acknowledged
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
        )
        client.reconnect_delay_set(1, 1)
        if username is not None:
            client.username_pw_set(username, password)
        if ca_file is not None:
            client.tls_set(ca_certs=str(ca_file))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

    def connect(self, timeout: float = WAIT_S) -> None:
        """Connect, and wait for the CONNACK and for the SUBACK of `topics`."""
        if self._v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 3600 if self._persistent else 0
            self._client.connect(
                "127.0.0.1", self.port, keepalive=10, clean_start=not self._persistent, properties=properties
            )
        else:
            self._client.connect("127.0.0.1", self.port, keepalive=10)
        self._client.loop_start()
        self.wait(lambda: self._connack is not None, f"{self._client_id}: CONNACK", timeout)
        assert self._connack is not None
        assert not self._connack.is_failure, f"the broker refused the test peer: {self._connack}"
        self.wait(self._subscribed, f"{self._client_id} subscribed to {self._topics}", timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Peer:
        self.connect()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- paho's thread -------------------------------------------------------------

    def _on_connect(self, c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        mid = None
        if not reason.is_failure and self._topics:
            _, mid = c.subscribe([(topic, 1) for topic in self._topics])
        with self._changed:
            self._connack = reason
            self._connected = not reason.is_failure
            self._resubscribed = mid
            self._changed.notify_all()

    def _on_disconnect(self, c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        with self._changed:
            self._connected = False

    def _on_subscribe(self, c: paho.Client, u: object, mid: int, reasons: list[ReasonCode], p: object) -> None:
        with self._changed:
            self._subacks[mid] = reasons
            self._changed.notify_all()

    def _on_publish(self, c: paho.Client, u: object, mid: int, reason: ReasonCode, p: object) -> None:
        with self._changed:
            if not reason.is_failure:
                self._acked.add(mid)
            self._changed.notify_all()

    def _on_message(self, c: paho.Client, u: object, message: paho.MQTTMessage) -> None:
        received = Message(message.topic, bytes(message.payload), message.qos, bool(message.retain))
        with self._changed:
            self._messages.append(received)
            self._changed.notify_all()

    # -- the test's thread -----------------------------------------------------------

    def _subscribed(self) -> bool:
        return self._connected and (self._resubscribed is None or self._resubscribed in self._subacks)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, timeout):
                raise AssertionError(f"not within {timeout:g} s: {what}")

    def subscribe(self, *topics: str, timeout: float = WAIT_S) -> None:
        """Subscribe at QoS 1 (again on every reconnect) and wait for the SUBACK: messages
        published after this returns are seen."""
        self._topics.extend(topics)
        _, mid = self._client.subscribe([(topic, 1) for topic in topics])
        assert mid is not None, "not connected"
        self.wait(lambda: mid in self._subacks, f"SUBACK for {topics}", timeout)
        failed = [reason for reason in self._subacks[mid] if reason.is_failure]
        assert not failed, f"subscription to {topics} refused: {failed}"

    def publish(self, topic: str, payload: bytes | dict[str, Any], qos: int = 1, timeout: float = WAIT_S) -> None:
        """Publish; at QoS 1, until a PUBACK comes: the same body again whenever none came
        within RESEND_S (an order is idempotent by its order_id)."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        if qos == 0:
            self._client.publish(topic, body, qos=0)
            return
        deadline = time.monotonic() + timeout
        while True:
            self.wait(
                lambda: self._connected, f"connected to publish on {topic}", max(0.0, deadline - time.monotonic())
            )
            if self._acked_within(self._client.publish(topic, body, qos=qos).mid, RESEND_S):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no PUBACK for a message on {topic} within {timeout:g} s")

    def _acked_within(self, mid: int, timeout: float) -> bool:
        with self._changed:
            if not self._changed.wait_for(lambda: mid in self._acked, timeout):
                return False
            self.delivered += 1
            return True

    def mark(self) -> int:
        """The position after the last message received so far (for `wait_for(since=...)`)."""
        with self._changed:
            return len(self._messages)

    def messages(self, topic: str | None = None, since: int = 0) -> list[Message]:
        """What it has received (on `topic`), from position `since` on."""
        with self._changed:
            return [m for m in self._messages[since:] if topic is None or m.topic == topic]

    def payloads(self, topic: str) -> list[Any]:
        return [message.json() for message in self.messages(topic)]

    def states(self, device_id: str) -> list[str]:
        """The status messages seen for a device, in order."""
        return [status["state"] for status in self.payloads(status_topic(device_id))]

    def wait_online(self, device_id: str, times: int = 1, timeout: float = WAIT_S) -> None:
        self.wait(lambda: self.states(device_id).count("online") >= times, f"{device_id} online", timeout)

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
    """A connected peer of its own client id, subscribed (SUBACK received) to `topics` at QoS 1."""
    client = Peer(port, f"test-{name}-{uuid.uuid4().hex[:8]}", protocol=protocol)
    client.connect()
    try:
        if topics:
            client.subscribe(*topics)
        yield client
    finally:
        client.close()
