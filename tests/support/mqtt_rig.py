"""The rig of the MQTT tests (tests/test_mqtt_faults.py, tests/test_chaos_*.py): the agent
in a child process on a real broker, its log read read-only from the test, and paho
clients of the test's own on the broker side.

The agent runs tests/support/mqtt_agent.py (`serve(config)`, its inbound messages and
acknowledgements reported on stdout). Waits are on MQTT messages or on the log's
contents, with timeouts; where another process writes a file, the file is polled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.domain.state import inventory_id
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Row
from edge_agent.log.verify import verify
from tests.support import ROOT
from tests.support.configs import config_file

SPEED = 50
PREFIX = "factory"
RESEND_S = 2.0  # a publisher sends an order again when no PUBACK came within this
POLL_S = 0.05  # another process writes the log: nothing to wait on but the file itself
ONCE_PER_ORDER = ("OrderAccepted", "InventoryIssued", "TidiedUp")


def unique(role: str) -> str:
    """A device id of its own for every agent of every test."""
    return f"{role}-{uuid.uuid4().hex[:8]}"


def agent_config(
    folder: Path, port: int, device_id: str, *, settings: Mapping[str, Any] | None = None, **mqtt: Any
) -> Path:
    """A config file for one agent on the simulated profile, its log under `folder`;
    `settings` overrides top-level keys (`speed`, `log`...), `mqtt` adds to the mqtt section."""
    rig_mqtt = {"port": port, "protocol": "5", "topic_prefix": PREFIX, **mqtt}
    return config_file(folder, **{"device_id": device_id, "speed": SPEED, "mqtt": rig_mqtt, **(settings or {})})


def events_db(config: Path) -> Path:
    return config.parent / "data" / "events.db"


# -- the agent in a child process ------------------------------------------------------


class AgentProcess:
    """One run of tests/support/mqtt_agent.py; stdout (its JSON reports) and stderr (its
    log) go to files beside the config."""

    def __init__(self, config: Path, name: str, crash: Sequence[str]) -> None:
        self.name = name
        self.out = config.parent / f"{name}.out"
        self.err = config.parent / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        command = [sys.executable, "-m", "tests.support.mqtt_agent", str(config), *crash]
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)

    def log_text(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def reports(self, event: str) -> list[dict[str, Any]]:
        """Its complete stdout lines of that kind."""
        lines = self.out.read_text(encoding="utf-8").splitlines(keepends=True)
        found = [json.loads(line) for line in lines if line.endswith("\n")]
        return [r for r in found if r["event"] == event]

    def ids(self, event: str) -> list[str]:
        return [r["order_id"] for r in self.reports(event)]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.fail(f"agent {self.name} ended on its own (exit {self.proc.returncode})")

    def fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- its log ---\n{self.log_text()[-4000:]}")

    def wait_killed(self, timeout: float = 20.0) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"agent {self.name} did not kill itself within {timeout} s")
        if code != -signal.SIGKILL:
            self.fail(f"agent {self.name} exited with {code}, not by its own SIGKILL")

    def kill(self) -> None:
        """SIGKILL from outside, as a power cut would; it must have been running until then."""
        self.proc.send_signal(signal.SIGKILL)  # nothing, if it has already ended: the exit code tells
        code = self.proc.wait()
        if code != -signal.SIGKILL:
            self.fail(f"agent {self.name} ended on its own (exit {code}) before it was killed")

    def stop(self) -> None:
        """SIGTERM: an orderly stop, exit 0."""
        self.check_alive()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.fail(f"agent {self.name} did not stop within 20 s of SIGTERM")
        if code != 0:
            self.fail(f"agent {self.name} stopped with exit {code}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


Agents = Callable[..., AgentProcess]


@contextmanager
def agent_processes() -> Iterator[Agents]:
    """Starts agent processes (`start(config, name, *crash_args)`); none outlives the block.
    (A test module makes this its `agents` fixture.)"""
    started: list[AgentProcess] = []

    def start(config: Path, name: str, *crash: str) -> AgentProcess:
        agent = AgentProcess(config, name, crash)
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.close()


# -- the log, read-only ------------------------------------------------------------------


def read_log(db: Path) -> list[Row]:
    if not db.exists():
        return []
    with EventLog(db, readonly=True) as log_:
        return list(log_.rows())


def subjects(rows: Sequence[Row], type_: str) -> Counter[str]:
    return Counter(row.subject for row in rows if row.type == type_)


def outbox_cursor(db: Path) -> int:
    with EventLog(db, readonly=True) as log_:
        return log_.cursor(OUTBOX_CURSOR) or 0


def eventually(condition: Callable[[], bool], what: str, timeout: float = 30.0, *alive: AgentProcess) -> None:
    """Poll `condition` (it reads files other processes write) until it holds; the agents
    in `alive` must not end meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        for agent in alive:
            agent.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)


def all_tidied(db: Path, ids: Sequence[str]) -> Callable[[], bool]:
    return lambda: set(subjects(read_log(db), "TidiedUp")) >= set(ids)


def check_each_once(rows: Sequence[Row], ids: Sequence[str]) -> None:
    """Every order accepted, issued and tidied up exactly once; nothing else went wrong."""
    for type_ in ONCE_PER_ORDER:
        counts = subjects(rows, type_)
        assert counts == dict.fromkeys(ids, 1), f"{type_} not exactly once per order: {counts}"
    trouble = [(row.type, row.subject) for row in rows if row.type in ("OrderRejected", "OrderFailed")]
    assert not trouble, f"orders went wrong: {trouble}"
    issued = [json.loads(row.data)["inventory_id"] for row in rows if row.type == "InventoryIssued"]
    assert issued == [inventory_id(n) for n in range(1, len(issued) + 1)], f"inventory ids skip or repeat: {issued}"


def check_intact(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        verdict = verify(log_)
    assert verdict.fault is None, f"log verify: {verdict.fault}"


# -- a test-side MQTT client ---------------------------------------------------------


class Peer:
    """A paho client of the test's own: reconnects by itself (every second), subscribes
    again on every connect, keeps what it receives, and publishes at QoS 1 until the
    broker acknowledges."""

    def __init__(
        self,
        port: int,
        client_id: str,
        topics: Sequence[str] = (),
        *,
        persistent: bool = False,
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self._topics = list(topics)
        self._cond = threading.Condition()
        self._connected = False
        self._subscribed = not topics
        self._acked: set[int] = set()
        self.delivered = 0  # orders the broker has acknowledged
        self.received: list[tuple[str, bytes]] = []
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
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
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600 if persistent else 0
        client.connect("127.0.0.1", port, keepalive=10, clean_start=not persistent, properties=properties)
        client.loop_start()
        self._client = client
        self.wait(lambda: self._connected and self._subscribed, f"{client_id} connected and subscribed", 10)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # paho's thread

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            return
        if self._topics:
            client.subscribe([(topic, 1) for topic in self._topics])
        with self._cond:
            self._connected = True
            self._cond.notify_all()

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        with self._cond:
            self._connected = False

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: object, props: object) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode, props: object) -> None:
        with self._cond:
            if not reason.is_failure:
                self._acked.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.received.append((message.topic, bytes(message.payload)))
            self._cond.notify_all()

    # the test's thread

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise AssertionError(f"not within {timeout} s: {what}")

    def publish(self, topic: str, payload: bytes, timeout: float = 60.0) -> None:
        """At QoS 1 until a PUBACK comes; the same body again whenever none came within
        RESEND_S (an order is idempotent by its order_id)."""
        deadline = time.monotonic() + timeout
        while True:
            self.wait(
                lambda: self._connected, f"connected to publish on {topic}", max(0.0, deadline - time.monotonic())
            )
            if self._acked_within(self._client.publish(topic, payload, qos=1).mid, RESEND_S):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"no PUBACK for a message on {topic} within {timeout} s")

    def _acked_within(self, mid: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acked, timeout):
                return False
            self.delivered += 1
            self._cond.notify_all()
            return True

    def messages_from(self, start: int) -> list[tuple[str, bytes]]:
        """What it has received, (topic, payload), from the `start`th message on."""
        with self._cond:
            return self.received[start:]

    def payloads(self, topic: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(payload) for t, payload in self.received if t == topic]

    def states(self, device_id: str) -> list[str]:
        """The status messages seen for a device, in order."""
        return [status["state"] for status in self.payloads(f"{PREFIX}/{device_id}/status")]

    def wait_online(self, device_id: str, times: int = 1, timeout: float = 30.0) -> None:
        self.wait(lambda: self.states(device_id).count("online") >= times, f"{device_id} online", timeout)


def status_topic(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/status"


def orders_topic(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/orders"
