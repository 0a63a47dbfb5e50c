"""The MQTT contract and the bad-input table of the README, end to end.

`edge-agent run` is a real child process with a config file; the back office is
a paho peer (tests/support/peer.py), the `edge-agent order submit` CLI, or the
Mosquitto command-line clients. Each test runs against both brokers where that
makes sense: the embedded amqtt broker that the agent hosts itself (MQTT 3.1.1),
and a real Mosquitto (MQTT 5).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge_agent import __version__
from edge_agent.log.store import EventLog, Row
from tests.support import ROOT, WAIT_S
from tests.support.agent_process import AgentProcess
from tests.support.brokers import Mosquitto
from tests.support.configs import config_file
from tests.support.orders import order, order_body
from tests.support.peer import PREFIX, Message, Peer, on, peer
from tests.support.ports import free_port, wait_for_port

pytestmark = pytest.mark.slow

ORDERS = f"{PREFIX}/orders"
MAX_PAYLOAD = 16384  # room for a nesting deeper than JSON parsers allow, still small enough to exceed
EVENT_KEYS = {"device_id", "seq", "ts", "type", "subject", "data"}
STATUS_KEYS = {"state", "since", "version"}  # no log position: a retained one would be stale
INVENTORY_KEYS = {"inventory_id", "order_id", "product_id", "qty", "warehouse", "device_id", "completed_at"}
TELEMETRY_KEYS = {
    "device_id",
    "ts",
    "stations",
    "waiting",
    "building",
    "shipped",
    "last_seq",
    "outbox_lag",
    "uptime_s",
}


# -- brokers and agents ------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    name: str
    port: int
    protocol: str  # what the agent and the test peers speak to it
    embedded: bool  # hosted by the agent process itself


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> Broker:
    if request.param == "mosquitto":
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto_broker")
        return Broker("mosquitto", mosquitto.port, "5", embedded=False)
    return Broker("amqtt", free_port(), "3.1.1", embedded=True)


class Topic:
    """The device's topics, spelled out from the README's contract (not from the code under test)."""

    def __init__(self, device_id: str) -> None:
        own = f"{PREFIX}/{device_id}"
        self.orders = f"{own}/orders"
        self.cancel = f"{own}/cmd/cancel"
        self.rebirth = f"{own}/cmd/rebirth"
        self.status = f"{own}/status"
        self.events = f"{own}/events"
        self.inventory = f"{own}/inventory"
        self.rejected = f"{own}/orders/rejected"
        self.state = f"{own}/state"
        self.telemetry = f"{own}/telemetry"


class CellAgent(AgentProcess):
    """`edge-agent run --config FILE` as a child process on the broker under test, with a
    device id of its own."""

    def __init__(self, folder: Path, broker: Broker) -> None:
        self.broker = broker
        self.device_id = f"cell-{uuid.uuid4().hex[:8]}"
        self.topic = Topic(self.device_id)
        config = config_file(
            folder,
            device_id=self.device_id,
            speed=50,
            telemetry_interval_s=0.5,
            limits={"max_payload_bytes": MAX_PAYLOAD},
            mqtt={"embedded": broker.embedded, "port": broker.port, "protocol": broker.protocol},
        )
        super().__init__(config)
        self.db = folder / "data" / "events.db"

    def start(self) -> None:
        """Start, and return once the agent has said `online` on its status topic."""
        super().start()
        try:
            if self.broker.embedded:
                wait_for_port(self.broker.port)
            with self.peer(self.topic.status) as watcher:
                watcher.wait_for(lambda m: m.topic == self.topic.status and m.json()["state"] == "online")
        except (AssertionError, TimeoutError) as error:
            self.fail(f"the agent did not come online: {error}")

    def peer(self, *topics: str, name: str = "peer") -> AbstractContextManager[Peer]:
        return peer(self.broker.port, self.broker.protocol, *topics, name=name)

    def rows(self, type_: str | None = None, subject: str | None = None) -> list[Row]:
        """The log as it is now (read-only; the agent may be writing)."""
        with EventLog(self.db, readonly=True) as log_:
            return list(log_.rows(type_=type_, subject=subject))

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`edge-agent ARGS --config FILE`."""
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", *args, "--config", str(self.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


AgentFactory = Callable[..., CellAgent]


@pytest.fixture
def new_agent(tmp_path: Path, broker: Broker) -> Iterator[AgentFactory]:
    """Make agents on the broker under test (`start=False` to start one later); each is
    stopped by SIGTERM at the end, and must then exit 0 unless the test killed it."""
    made: list[CellAgent] = []

    def make(start: bool = True) -> CellAgent:
        agent = CellAgent(tmp_path / f"agent{len(made)}", broker)
        made.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in made:
        if agent.proc is None or agent.proc.returncode is not None:  # never started, or stopped by the test
            continue
        agent.stop()  # exit 0


def event(topic: Topic, type_: str, subject: str | None = None) -> Callable[[Message], bool]:
    """An event of that type (and subject) on the device's events topic."""

    def matches(message: Message) -> bool:
        if message.topic != topic.events:
            return False
        body = message.json()
        return bool(body["type"] == type_ and (subject is None or body["subject"] == subject))

    return matches


def first_occurrences(messages: list[Message]) -> list[dict[str, Any]]:
    """Events in arrival order, a redelivered seq counted once (at least once delivery)."""
    seen: set[int] = set()
    firsts = []
    for message in messages:
        body = message.json()
        if body["seq"] not in seen:
            seen.add(body["seq"])
            firsts.append(body)
    return firsts


def assert_iso(value: object) -> None:
    assert isinstance(value, str), value
    assert datetime.fromisoformat(value).tzinfo is not None, f"{value} has no time zone"


# -- 1. bad input -------------------------------------------------------------


def _with(**changes: object) -> bytes:
    return orjson.dumps(order_body(order("bad", qty=2), **changes))


def _oversized() -> bytes:
    """An order that would be valid but for its size: JSON whitespace up to one byte over."""
    body = orjson.dumps(order_body(order("bad-size", qty=2)))
    return body[:-1] + b" " * (MAX_PAYLOAD + 1 - len(body)) + b"}"


def _nested_in_qty(depth: int) -> bytes:
    return _with(order_id="bad-deep", qty="@").replace(b'"@"', b"[" * depth + b"]" * depth)


WITHOUT_QTY = {"order_id": "bad-missing", "product_id": "widget-a", "warehouse": "WH1"}

# (label, payload, the order id the rejection names, a part of its reason)
BAD_INPUT: list[tuple[str, bytes, str | None, str]] = [
    ("not JSON", b"not json {", None, "payload is not JSON"),
    ("empty", b"", None, "not JSON"),
    ("not UTF-8", b'{"order_id": "\xff\xfe"}', None, "not UTF-8"),
    ("over max_payload_bytes", _oversized(), None, f"over the limit of {MAX_PAYLOAD}"),
    ("missing field", orjson.dumps(WITHOUT_QTY), "bad-missing", "qty: Field required"),
    ("extra field", _with(order_id="bad-extra", colour="red"), "bad-extra", "colour: unknown field"),
    ("qty as a string", _with(order_id="bad-str", qty="3"), "bad-str", "qty: Input should be a valid integer"),
    ("qty as a bool", _with(order_id="bad-bool", qty=True), "bad-bool", "qty: Input should be a valid integer"),
    ("qty as a float", _with(order_id="bad-float", qty=2.0), "bad-float", "qty: Input should be a valid integer"),
    ("unknown product", _with(order_id="bad-product", product_id="sprocket"), "bad-product", "unknown product"),
    ("qty 0", _with(order_id="bad-zero", qty=0), "bad-zero", "qty: Input should be greater than or equal to 1"),
    ("qty over the profile max", _with(order_id="bad-101", qty=101), "bad-101", "qty 101 is over the largest 100"),
    ("order_id with a space", _with(order_id="bad id"), None, "order_id: String should match pattern"),
    ("order_id of 65 chars", _with(order_id="x" * 65), None, "order_id: String should match pattern"),
    ("JSON array", orjson.dumps([order_body(order("bad-array", qty=2))]), None, "not an object"),
    ("JSON string", b'"an order"', None, "not an object"),
    ("5000 nested arrays", b"[" * 5000 + b"]" * 5000, None, "not JSON"),
    ("deep nesting in a field", _nested_in_qty(500), "bad-deep", "qty: Input should be a valid integer"),
    ("ESC in warehouse", _with(order_id="bad-esc", warehouse="WH\x1b[2J"), "bad-esc", "warehouse: must not contain"),
    ("CSI in product", _with(order_id="bad-csi", product_id="w\x9bidget"), "bad-csi", "product_id: must not contain"),
    ("newline in warehouse", _with(order_id="bad-nl", warehouse="WH1\nWH2"), "bad-nl", "(U+000A at 3)"),
    ("a key twice", _with(order_id="bad-twice")[:-1] + b',"qty":90}', "bad-twice", "payload has the key 'qty' twice"),
    ("JSON null", b"null", None, "payload is JSON null, not an object"),
    (
        "qty 10**27",
        _with(order_id="bad-huge", qty="@").replace(b'"@"', b"1" + b"0" * 27),
        "bad-huge",
        "qty: out of range",
    ),
    (
        "bidi override",
        _with(order_id="bad-bidi", warehouse="WH\u202e1HW"),
        "bad-bidi",
        "a bidirectional control (U+202E",
    ),
    ("line separator", _with(order_id="bad-ls", warehouse="WH1\u2028WH2"), "bad-ls", "(U+2028 at 3)"),
]


def test_every_bad_input_is_rejected_with_a_reason_and_a_valid_order_after_completes(
    new_agent: AgentFactory, broker: Broker
) -> None:
    agent = new_agent()
    topic = agent.topic
    with agent.peer(topic.events, topic.rejected, topic.inventory) as backoffice:
        for label, payload, order_id, reason in BAD_INPUT:
            mark = backoffice.mark()
            backoffice.publish(ORDERS, payload)
            rejected = backoffice.wait_for(lambda m: m.topic == topic.rejected, since=mark).json()
            assert rejected["order_id"] == order_id, label
            assert reason in rejected["reason"], (label, rejected)
            if label == "not JSON":
                assert rejected["reason"] == "payload is not JSON"  # the parser's internals help nobody
            assert len(rejected["reason"]) < 500, (label, "a reason, not an echo of the payload")
            assert_iso(rejected["received_at"])
            logged = backoffice.wait_for(event(topic, "OrderRejected"), since=mark).json()
            assert logged["subject"] == (order_id or ""), label
            assert logged["data"]["reason"] == rejected["reason"], label
            assert set(rejected) == {"order_id", "reason", "received_at", "seq"}, label
            assert rejected["seq"] == logged["seq"], label  # deduplicated by (device_id, seq), like events
            agent.check_alive()

        good = order_body(order("good-after-bad", qty=2, warehouse="WH7"))
        backoffice.publish(ORDERS, good)
        record = backoffice.wait_for(on(topic.inventory, order_id="good-after-bad")).json()
        backoffice.wait_for(event(topic, "TidiedUp", "good-after-bad"))

        if not broker.embedded:
            # Every rejection was acknowledged: after a restart (a persistent session) the broker
            # has nothing to send again. A new order after it proves the redeliveries are done.
            agent.stop()
            agent.start()
            backoffice.publish(ORDERS, order_body(order("after-restart", qty=1)))
            backoffice.wait_for(event(topic, "TidiedUp", "after-restart"))

    issued = agent.rows("InventoryIssued", "good-after-bad")
    assert len(issued) == 1
    assert record == {
        "inventory_id": "INV00001",
        "order_id": "good-after-bad",
        "product_id": "widget-a",
        "qty": 2,
        "warehouse": "WH7",
        "device_id": agent.device_id,
        "completed_at": issued[0].ts,
    }
    # Nothing but the good orders became work items; every bad one left only its rejection.
    accepted = [row.subject for row in agent.rows("OrderAccepted")]
    assert accepted == ["good-after-bad"] if broker.embedded else ["good-after-bad", "after-restart"]
    assert len(agent.rows("OrderRejected")) == len(BAD_INPUT)
    status = agent.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["inventory_seq"] == len(accepted)
    assert view["work_items"] == []
    assert all(station["order_id"] is None for station in view["stations"])


# -- 2. outbound contract ------------------------------------------------------------------


def test_status_and_state_are_retained_and_rebirth_republishes_them(new_agent: AgentFactory) -> None:
    agent = new_agent()
    topic = agent.topic
    with agent.peer(topic.status, topic.state, name="late") as late:  # subscribes after the agent is online
        status_message = late.wait_for(on(topic.status))
        state_message = late.wait_for(on(topic.state))
        assert status_message.retain
        assert state_message.retain
        status = status_message.json()
        assert set(status) == STATUS_KEYS
        assert status["state"] == "online"
        assert status["version"] == __version__
        assert_iso(status["since"])

        state = state_message.json()
        assert state["device_id"] == agent.device_id
        assert [s["id"] for s in state["stations"]] == ["s1", "s2", "s3"]
        assert all(s["order_id"] is None for s in state["stations"])
        assert {"state", "order_id", "queue"} <= set(state["lane"])
        assert state["work_items"] == []
        assert state["estop"] is False

        mark = late.mark()
        late.publish(topic.rebirth, b"{}")
        again = late.wait_for(on(topic.status), since=mark).json()
        assert again["state"] == "online"
        assert set(again) == STATUS_KEYS
        again_state = late.wait_for(on(topic.state), since=mark).json()
        assert again_state["last_seq"] == agent.rows()[-1].seq  # the log position is in `state`, current
        assert late.wait_for(on(topic.state), since=mark).json()["stations"] == state["stations"]


def test_every_event_arrives_in_seq_order_with_its_keys(new_agent: AgentFactory, broker: Broker) -> None:
    agent = new_agent(start=False)
    topic = agent.topic
    with ExitStack() as stack:
        if broker.embedded:  # the broker lives in the agent: subscribe once it is up
            agent.start()
            watcher = stack.enter_context(agent.peer(topic.events, topic.inventory))
        else:  # subscribe first: every event from seq 1 on
            watcher = stack.enter_context(agent.peer(topic.events, topic.inventory))
            agent.start()
        watcher.publish(ORDERS, order_body(order("in-order", qty=3)))
        inventory = watcher.wait_for(on(topic.inventory, order_id="in-order")).json()
        tidied = watcher.wait_for(event(topic, "TidiedUp", "in-order")).json()
        received = watcher.messages(topic.events)

    firsts = first_occurrences(received)
    seqs = [body["seq"] for body in firsts]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "out of order, or a gap"
    if not broker.embedded:
        assert seqs[0] == 1
    assert seqs[-1] >= tidied["seq"]
    rows = {row.seq: row for row in agent.rows()}
    for body in firsts:
        assert set(body) == EVENT_KEYS
        row = rows[body["seq"]]
        assert body["device_id"] == agent.device_id
        assert (body["ts"], body["type"], body["subject"]) == (row.ts, row.type, row.subject)
        assert body["data"] == json.loads(row.data)
    types = [body["type"] for body in firsts if body["subject"] == "in-order"]
    assert types[0] == "OrderAccepted"
    assert types.count("UnitBuilt") == 3
    assert types.index("InventoryIssued") < types.index("TidiedUp")
    assert set(inventory) == INVENTORY_KEYS
    issued = next(body for body in firsts if body["type"] == "InventoryIssued")
    assert inventory["completed_at"] == issued["ts"]
    assert inventory["inventory_id"] == issued["data"]["inventory_id"] == "INV00001"


def test_telemetry_comes_at_qos_0_and_a_cancel_stops_a_build(new_agent: AgentFactory, broker: Broker) -> None:
    agent = new_agent()
    topic = agent.topic
    with agent.peer(topic.telemetry, topic.events, topic.state, topic.rejected) as watcher:
        idle = watcher.wait_for(on(topic.telemetry))
        if not broker.embedded:  # amqtt 0.12 delivers at the subscription's QoS, whatever the publisher's
            assert idle.qos == 0  # subscribed at QoS 1: the agent published at 0
        body = idle.json()
        assert set(body) == TELEMETRY_KEYS
        assert body["device_id"] == agent.device_id
        assert body["stations"] == {"busy": 0, "free": 3}
        assert (body["waiting"], body["building"], body["shipped"]) == (0, [], 0)
        assert isinstance(body["last_seq"], int)
        assert isinstance(body["outbox_lag"], int)
        assert body["outbox_lag"] >= 0
        assert body["uptime_s"] >= 0
        assert_iso(body["ts"])

        # 100 units at 1.5 s each, 50 times faster: three seconds of building to cancel.
        watcher.publish(ORDERS, order_body(order("cancel-me", product="gadget-b", qty=100)))
        assigned = watcher.wait_for(event(topic, "StationAssigned", "cancel-me")).json()
        building = watcher.wait_for(
            lambda m: m.topic == topic.telemetry and m.json()["stations"]["busy"] == 1,
        ).json()
        assert building["stations"] == {"busy": 1, "free": 2}
        [item] = building["building"]
        assert item["order_id"] == "cancel-me"
        assert item["station"] == assigned["data"]["station"]
        assert 0 <= item["progress"] <= 100

        # A cancel that is not one, and one for no such order: refused with a reason, and the agent lives on.
        mark = watcher.mark()
        watcher.publish(topic.cancel, b"{not json")
        refused = watcher.wait_for(on(topic.rejected), since=mark).json()
        assert (refused["order_id"], refused["reason"]) == (None, "cancel refused: payload is not JSON")
        assert_iso(refused["received_at"])
        mark = watcher.mark()
        watcher.publish(topic.cancel, {"order_id": "no-such-order"})
        refused = watcher.wait_for(on(topic.rejected), since=mark).json()
        assert refused["order_id"] == "no-such-order"
        assert refused["reason"] == "cancel refused: order 'no-such-order' is not a live work item"
        mark = watcher.mark()
        watcher.publish(topic.cancel, {"order_id": "X\u001b"})
        refused = watcher.wait_for(on(topic.rejected), since=mark).json()
        assert (refused["order_id"], refused["reason"]) == (
            None,
            "cancel refused: order_id: must not contain a control character (U+001B at 1)",
        )
        mark = watcher.mark()
        watcher.publish(topic.cancel, {"order_id": "cancel-me"})
        watcher.wait_for(event(topic, "OrderCancelled", "cancel-me"), since=mark)
        watcher.wait_for(
            lambda m: m.topic == topic.state and all(s["order_id"] is None for s in m.json()["stations"]),
            since=mark,
        )
        freed = watcher.wait_for(
            lambda m: m.topic == topic.telemetry and m.json()["stations"]["busy"] == 0, since=mark
        ).json()
        assert freed["building"] == []
    agent.check_alive()
    assert agent.rows("OrderCancelled", "cancel-me")
    assert not agent.rows("InventoryIssued", "cancel-me")
    assert not agent.rows("BuildComplete", "cancel-me")


# -- 3. idempotency ----------------------------------------------------------------------


def test_the_same_order_twice_is_one_work_item_and_another_body_is_a_conflicting_duplicate(
    new_agent: AgentFactory,
) -> None:
    agent = new_agent()
    topic = agent.topic
    body = order_body(order("twice", qty=1))
    with agent.peer(topic.events, topic.rejected, topic.inventory) as backoffice:
        # Back to back (the agent may well decide them in one batch): the order, the same order
        # laid out otherwise to the device's own topic, then again as it was.
        backoffice.publish(ORDERS, body)
        backoffice.publish(topic.orders, orjson.dumps(dict(reversed(body.items()))))
        backoffice.publish(ORDERS, body)
        # The same id with another body: rejected (and, arriving after them, proof they were handled).
        backoffice.publish(ORDERS, {**body, "qty": 2})
        conflict = backoffice.wait_for(on(topic.rejected, order_id="twice")).json()
        assert "conflicting duplicate" in conflict["reason"]
        backoffice.wait_for(on(topic.inventory, order_id="twice"))
        backoffice.wait_for(event(topic, "TidiedUp", "twice"))
        # Tidied up, still the same order: a late redelivery must not build it again.
        mark = backoffice.mark()
        backoffice.publish(ORDERS, body)
        backoffice.publish(ORDERS, {**body, "warehouse": "WH2"})
        backoffice.wait_for(on(topic.rejected, order_id="twice"), since=mark)
        inventories = backoffice.messages(topic.inventory)

    assert len(agent.rows("OrderAccepted", "twice")) == 1
    assert len(agent.rows("InventoryIssued")) == 1
    assert len(agent.rows("OrderRejected", "twice")) == 2
    assert {m.json()["inventory_id"] for m in inventories} == {"INV00001"}


# -- 4. Last Will and the farewell ---------------------------------------------------------


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)  # the embedded broker dies with the agent
def test_a_killed_agent_leaves_its_last_will_offline(new_agent: AgentFactory) -> None:
    agent = new_agent()
    topic = agent.topic
    with agent.peer(topic.status) as watcher:
        watcher.wait_for(on(topic.status, state="online"))
        mark = watcher.mark()
        agent.stop(signal.SIGKILL, expect=None)
        will = watcher.wait_for(on(topic.status), since=mark).json()
    assert will["state"] == "offline"
    assert set(will) == STATUS_KEYS
    assert will["version"] == __version__
    with agent.peer(topic.status, name="late") as late:
        retained = late.wait_for(on(topic.status))
    assert retained.retain
    assert retained.json()["state"] == "offline"


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_a_stopped_agent_leaves_offline_retained(new_agent: AgentFactory) -> None:
    agent = new_agent()
    agent.stop(signal.SIGTERM)
    with agent.peer(agent.topic.status, name="late") as late:
        retained = late.wait_for(on(agent.topic.status))
    assert retained.retain
    status = retained.json()
    assert set(status) == STATUS_KEYS
    assert status["state"] == "offline"
    assert_iso(status["since"])


# -- 5. edge-agent order submit -------------------------------------------------------------


@pytest.mark.parametrize("broker", ["amqtt"], indirect=True)
def test_order_submit_wait_follows_an_order_to_its_inventory_and_exits_1_on_rejection(
    new_agent: AgentFactory,
) -> None:
    agent = new_agent()
    done = agent.cli("order", "submit", "widget-a", "2", "--warehouse", "WH1", "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert f"accepted by {agent.device_id}" in done.stdout
    assert "inventory INV00001 in WH1" in done.stdout

    refused = agent.cli(
        "order", "submit", "sprocket", "1", "--warehouse", "WH1", "--order-id", "no-such", "--wait", "--timeout", "60"
    )
    assert refused.returncode == 1, refused.stdout
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "no-such" in lines[0]
    assert "rejected" in lines[0]
    assert "unknown product 'sprocket'" in lines[0]


@pytest.mark.parametrize("broker", ["amqtt"], indirect=True)
def test_a_retried_finished_order_is_a_duplicate_nothing_logged_or_published_again(new_agent: AgentFactory) -> None:
    """A sender's retry (same order id, same body) of a finished order is acknowledged and
    changes nothing: no event logged, no inventory record or event published again."""
    agent = new_agent()
    submit = ["order", "submit", "widget-a", "1", "--warehouse", "WH1"]
    first = agent.cli(*submit, "--order-id", "retried", "--wait", "--timeout", "60")
    assert first.returncode == 0, first.stderr
    assert "inventory INV00001 in WH1" in first.stdout
    logged = len(agent.rows(subject="retried"))
    with agent.peer(agent.topic.events, agent.topic.inventory, agent.topic.rejected) as watcher:
        assert agent.cli(*submit, "--order-id", "retried").returncode == 0
        # an order sent after the retry: once it is taken, the retry has been decided
        assert agent.cli(*submit, "--order-id", "after").returncode == 0
        watcher.wait_for(event(agent.topic, "OrderAccepted", "after"))
        about_retried = [m for m in watcher.messages() if b"retried" in m.payload]
    assert about_retried == []
    assert len(agent.rows(subject="retried")) == logged


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_order_submit_wait_for_a_finished_order_answers_at_once_from_the_log(new_agent: AgentFactory) -> None:
    """The device answers nothing to an order id it has taken; its log, readable here, does."""
    agent = new_agent()
    submit = ["order", "submit", "widget-a", "1", "--warehouse", "WH1", "--order-id", "H-22", "--wait"]
    assert agent.cli(*submit, "--timeout", "60").returncode == 0
    again = agent.cli(*submit, "--timeout", "30")
    assert again.returncode == 0, again.stderr
    assert "already finished: inventory INV00001 in WH1" in again.stdout

    other_body = agent.cli(*submit[:3], "2", *submit[4:], "--timeout", "30")
    assert other_body.returncode == 1, other_body.stdout
    assert "order H-22 rejected: conflicting duplicate" in other_body.stderr.strip()
    assert len(other_body.stderr.strip().splitlines()) == 1, other_body.stderr

    topic = agent.topic
    with agent.peer(topic.events) as watcher:
        watcher.publish(ORDERS, order_body(order("gone", product="gadget-b", qty=100)))
        watcher.wait_for(event(topic, "StationAssigned", "gone"))
        assert agent.cli("order", "cancel", "gone", "--wait", "--timeout", "30").returncode == 0
    cancelled = agent.cli(
        "order", "submit", "gadget-b", "100", "--warehouse", "WH1", "--order-id", "gone", "--wait", "--timeout", "30"
    )
    assert cancelled.returncode == 1, cancelled.stdout
    assert "order gone was cancelled" in cancelled.stderr
    assert len(cancelled.stderr.strip().splitlines()) == 1, cancelled.stderr


@pytest.mark.parametrize("broker", ["amqtt"], indirect=True)
def test_order_submit_with_a_malformed_order_id_is_a_usage_error(new_agent: AgentFactory) -> None:
    """A bad --order-id is a usage error (exit 2, one line naming it), found before publishing."""
    agent = new_agent()
    submit = ["order", "submit", "widget-a", "1", "--warehouse", "WH1", "--order-id", "bad id"]
    result = agent.cli(*submit, "--wait", "--timeout", "3")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "did not reach the warehouse" not in lines[0]
    assert "order-id" in lines[0] or "order_id" in lines[0]
    assert result.returncode == 2


@pytest.mark.parametrize("broker", ["amqtt"], indirect=True)
def test_order_submit_to_a_port_where_nothing_listens_fails_in_one_line(new_agent: AgentFactory) -> None:
    agent = new_agent(start=False)  # its config names a free port, and nothing is started there
    result = agent.cli("order", "submit", "widget-a", "1", "--warehouse", "WH1", "--wait", "--timeout", "5")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert "cannot reach the broker" in lines[0]
    assert str(agent.broker.port) in lines[0]


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)  # a broker, and no agent behind it
def test_order_submit_wait_gives_up_after_its_timeout_in_one_line(new_agent: AgentFactory) -> None:
    agent = new_agent(start=False)
    submit = ["order", "submit", "widget-a", "1", "--warehouse", "WH1", "--order-id", "lost"]
    result = agent.cli(*submit, "--wait", "--timeout", "0.5")
    assert result.returncode == 1, result.stdout
    assert "submitted lost" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "order lost did not reach the warehouse within 0.5 s" in lines[0]
    # no agent: the line must not say the id was taken before, only that it may have been
    assert "the device may be down or unreachable" in lines[0]
    assert "log show --subject lost" in lines[0]


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)  # a broker, and no agent behind it
def test_a_device_that_is_not_a_device_id_is_a_usage_error_and_nothing_is_sent(new_agent: AgentFactory) -> None:
    """Not a topic level (`a/b`, `#`, `+`), nor empty (which would send to the whole fleet)."""
    agent = new_agent(start=False)
    submit = ["order", "submit", "widget-a", "1", "--warehouse", "WH1"]
    with agent.peer("#") as everything:
        for device in ("a/b", "#", ""):
            refused = agent.cli(*submit, "--device", device)
            assert refused.returncode == 2, (device, refused.stderr)
            assert "--device" in refused.stderr.strip()
            assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        refused = agent.cli("order", "cancel", "X", "--device", "+")
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        # a good one after them: once it is there, anything the refused ones sent would be too
        assert agent.cli(*submit, "--device", "cell-7", "--order-id", "after").returncode == 0
        everything.wait_for(on(f"{PREFIX}/cell-7/orders", order_id="after"))
        assert [m.topic for m in everything.messages()] == [f"{PREFIX}/cell-7/orders"]


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_order_cancel_wait_exits_0_once_cancelled_and_1_with_the_reason_when_it_cannot_apply(
    new_agent: AgentFactory,
) -> None:
    agent = new_agent()
    topic = agent.topic
    with agent.peer(topic.events) as watcher:
        # 100 units at 1.5 s each, 50 times faster: three seconds of building to cancel.
        watcher.publish(ORDERS, order_body(order("to-cancel", product="gadget-b", qty=100)))
        watcher.wait_for(event(topic, "StationAssigned", "to-cancel"))
        done = agent.cli("order", "cancel", "to-cancel", "--wait", "--timeout", "30")
        assert done.returncode == 0, done.stderr
        assert f"asked {agent.device_id} to cancel to-cancel" in done.stdout
        assert "order to-cancel cancelled" in done.stdout
    assert len(agent.rows("OrderCancelled", "to-cancel")) == 1
    assert not agent.rows("InventoryIssued", "to-cancel")

    for order_id in ("to-cancel", "never-sent"):  # finished, and unknown: nothing to cancel
        refused = agent.cli("order", "cancel", order_id, "--device", agent.device_id, "--wait", "--timeout", "30")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert f"order {order_id}: cancel refused: order '{order_id}' is not a live work item" in lines[0]

    bad = agent.cli("order", "cancel", "bad id", "--wait", "--timeout", "3")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "order_id" in bad.stderr


# -- 6. the Mosquitto command-line clients ------------------------------------------------


def test_mosquitto_pub_and_sub_carry_an_order_to_its_inventory(new_agent: AgentFactory, broker: Broker) -> None:
    tools = [shutil.which(name) for name in ("mosquitto_pub", "mosquitto_sub", "stdbuf")]
    if None in tools:
        pytest.skip("needs mosquitto_pub, mosquitto_sub (apt-get install mosquitto-clients) and stdbuf")
    agent = new_agent()
    version = "mqttv5" if broker.protocol == "5" else "mqttv311"
    connection = ["-h", "127.0.0.1", "-p", str(broker.port), "-V", version, "-q", "1"]
    # -d prints "received SUBACK" once subscribed; stdbuf makes it arrive at once down the pipe.
    # -R: amqtt 0.12 sends a new client the retained messages of *other* clients' subscriptions
    # (here the agent's status), which -C 1 would otherwise count.
    once = ["-d", "-R", "-C", "1", "-W", str(int(WAIT_S))]
    sub = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", *connection, *once, "-t", agent.topic.inventory],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None
        for line in sub.stdout:
            if "SUBACK" in line:
                break
        else:
            raise AssertionError(f"mosquitto_sub never subscribed: {sub.communicate()[1]}")
        body = json.dumps(order_body(order("from-the-shell", product="gadget-b", qty=1, warehouse="WH3")))
        subprocess.run(["mosquitto_pub", *connection, "-t", ORDERS, "-m", body], check=True, timeout=WAIT_S)
        out, err = sub.communicate(timeout=WAIT_S + 5)
    finally:
        sub.kill()
    assert sub.returncode == 0, err
    [payload] = [line for line in out.splitlines() if line.startswith("{")]
    record = json.loads(payload)
    assert set(record) == INVENTORY_KEYS
    assert (record["inventory_id"], record["order_id"], record["product_id"], record["qty"]) == (
        "INV00001",
        "from-the-shell",
        "gadget-b",
        1,
    )
    assert (record["warehouse"], record["device_id"]) == ("WH3", agent.device_id)
