"""A short-lived MQTT client for the CLI: publish one order, optionally follow its events."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttConfig
from edge_agent.errors import EdgeAgentError
from edge_agent.mqtt.link import secure


class BrokerUnreachable(EdgeAgentError):
    """The broker could not be reached or refused us."""


class Session:
    """A connected client whose received messages queue up for the caller."""

    def __init__(self, client: paho.Client) -> None:
        self._client = client
        self.received: queue.Queue[tuple[str, Any]] = queue.Queue()

    def publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout_s)
        if not info.is_published():
            raise BrokerUnreachable(f"the broker did not acknowledge the order within {timeout_s:g} s")

    def next_event(self, timeout_s: float) -> tuple[str, Any] | None:
        """The next (topic, JSON payload) received, or None after `timeout_s`."""
        try:
            return self.received.get(timeout=timeout_s)
        except queue.Empty:
            return None


@contextmanager
def session(config: MqttConfig, subscribe: list[str], timeout_s: float = 10.0) -> Iterator[Session]:
    """Connect (clean session, a throwaway client id) and subscribe before anything is published."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-cli-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv5 if config.protocol == "5" else MQTTProtocolVersion.MQTTv311,
    )
    secure(client, config)
    result = Session(client)
    ready: queue.Queue[ReasonCode] = queue.Queue()

    def connected(c: paho.Client, u: object, f: object, reason: ReasonCode, p: object) -> None:
        if not reason.is_failure and subscribe:
            c.subscribe([(topic, 1) for topic in subscribe])
        else:
            ready.put(reason)

    def subscribed(c: paho.Client, u: object, mid: int, reasons: list[ReasonCode], p: object) -> None:
        ready.put(reasons[0])

    def message(c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        with suppress(orjson.JSONDecodeError):  # not ours to judge
            result.received.put((msg.topic, orjson.loads(msg.payload)))

    client.on_connect = connected
    client.on_subscribe = subscribed
    client.on_message = message
    try:
        client.connect(config.host, config.port, config.keepalive_s)
    except OSError as error:
        raise BrokerUnreachable(f"cannot reach the broker at {config.host}:{config.port}: {error}") from error
    client.loop_start()
    try:
        try:
            reason = ready.get(timeout=timeout_s)
        except queue.Empty:
            raise BrokerUnreachable(f"no answer from the broker at {config.host}:{config.port}") from None
        if reason.is_failure:
            raise BrokerUnreachable(f"the broker at {config.host}:{config.port} refused: {reason}")
        yield result
    finally:
        client.disconnect()
        client.loop_stop()
