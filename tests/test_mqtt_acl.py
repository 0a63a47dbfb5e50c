"""A broker that says no: a Mosquitto ACL that refuses the agent's messages on
a topic, and a broker that refuses the agent's credentials.

Under MQTT 5 Mosquitto answers a refused QoS 1 publish with PUBACK reason 0x87 (Not
authorized). Such a message is not delivered: the outbox cursor stays before it, it is
sent again with backoff, and the agent says why in its log, `/healthz`, the retained
`status` message and `/metrics` until the broker takes it.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_process import AgentProcess, Agents
from tests.support.brokers import mosquitto
from tests.support.mqtt_rig import (
    agent_config,
    all_tidied,
    events_db,
    eventually,
    orders_topic,
    outbox_cursor,
    read_log,
    unique,
)
from tests.support.orders import order, order_payload
from tests.support.peer import PREFIX, Peer, status_topic
from tests.support.ports import free_port

pytestmark = pytest.mark.slow


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/healthz")
    return status, json.loads(body)


def metric(port: int, name: str) -> float:
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


def acl(device: str, *, inventory: str) -> str:
    """Anonymous clients (the agent and the test's own) may use the device's topics; the
    agent's inventory topic only as `inventory` says (`read`: no publishing there)."""
    own = f"{PREFIX}/{device}"
    topics = [f"{PREFIX}/orders", f"{own}/orders", f"{own}/cmd/#", f"{own}/status", f"{own}/events"]
    topics += [f"{own}/orders/rejected", f"{own}/state", f"{own}/telemetry"]
    lines = [f"topic readwrite {topic}" for topic in topics] + [f"topic {inventory} {own}/inventory"]
    return "\n".join(lines) + "\n"


def unhealthy_with(port: int, *words: str) -> Callable[[], bool]:
    def check() -> bool:
        status, answer = health(port)
        return status == 503 and any(all(w in reason for w in words) for reason in answer["reasons"])

    return check


def test_an_inventory_record_the_broker_refuses_is_not_delivered_until_it_is_allowed(
    tmp_path: Path, agents: Agents
) -> None:
    device = unique("acl")
    rules = tmp_path / "acl"
    rules.write_text(acl(device, inventory="read"), encoding="utf-8")
    with mosquitto(tmp_path / "mosquitto", f"allow_anonymous true\nacl_file {rules}") as broker:
        http = free_port()
        config = agent_config(
            tmp_path / device, broker.port, device, settings={"http": {"enabled": True, "port": http}}
        )
        db = events_db(config)
        inventory = f"{PREFIX}/{device}/inventory"
        with Peer(broker.port, "back-office", [inventory, status_topic(device)]) as office:
            agent: AgentProcess = agents(config, "agent")
            office.wait_online(device)
            office.publish(orders_topic(device), order_payload(order("refused-1")))
            eventually(all_tidied(db, ["refused-1"]), "the order built", 30, agent)
            [issued] = [row.seq for row in read_log(db) if row.type == "InventoryIssued"]

            eventually(unhealthy_with(http, inventory, "Not authorized"), "/healthz names the refusal", 20, agent)
            eventually(lambda: metric(http, "edge_agent_publish_refused_total") >= 3, "three refusals", 30, agent)
            assert metric(http, "edge_agent_outbox_lag") > 0
            assert outbox_cursor(db) < issued  # the record's event is not counted delivered
            assert office.payloads(inventory) == []
            lines = [line for line in agent.log_text().splitlines() if "refuses" in line]
            assert len(lines) == 1, lines  # one line for the episode, not one per retry
            assert inventory in lines[0]
            assert "Not authorized" in lines[0]
            office.wait(
                lambda: any("Not authorized" in s.get("refused", "") for s in office.payloads(status_topic(device))),
                "the status names the refusal",
            )

            rules.write_text(acl(device, inventory="readwrite"), encoding="utf-8")
            assert broker.process is not None
            broker.process.send_signal(signal.SIGHUP)  # Mosquitto reads its ACL file again
            office.wait(lambda: bool(office.payloads(inventory)), "the inventory record", 60)
            [record] = office.payloads(inventory)
            assert (record["order_id"], record["inventory_id"]) == ("refused-1", "INV00001")
            eventually(lambda: health(http)[0] == 200, "healthy again", 20, agent)
            eventually(lambda: outbox_cursor(db) >= issued, "the cursor past the record", 20, agent)
            assert metric(http, "edge_agent_outbox_lag") == 0
            office.wait(
                lambda: "refused" not in office.payloads(status_topic(device))[-1], "the status without the refusal"
            )
            agent.stop()
