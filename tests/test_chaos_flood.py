"""Chaos: a flood of orders through a Mosquitto configured as a new install would be
("more than `limits.max_open_items` live orders: new orders rejected with
`queue full: N open`, never held unacknowledged, never dropped silently").

20,000 orders are published as fast as `mosquitto_pub` can send them at QoS 1 to a
Mosquitto 2 with only a listener and anonymous access: no persistence, its default
queue limits (`max_queued_messages 1000`: past it, messages queued for a slow client
are dropped). The agent may have 50 work items open. It must commit and acknowledge
every order promptly, so that nothing waits at the broker: each order is accepted and
built, or rejected with a reason, exactly once, none lost; the agent's memory stays
within 20 MB of what it used idle; and the newest snapshot stays small, whatever the
history.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from edge_agent.domain.state import inventory_id
from tests.support.agent_process import Agents
from tests.support.brokers import mosquitto
from tests.support.mqtt_rig import (
    agent_config,
    check_intact,
    events_db,
    eventually,
    orders_topic,
    read_log,
    unique,
)
from tests.support.peer import Peer, status_topic

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ORDERS = 20_000
MAX_OPEN = 50
SPEED = 20  # a unit in 0.05 s, a transit in 0.15 s; the unit timeout (0.5 s) well above a busy machine's delays
# The broker may hand the agent the whole flood at once (it asks for a Receive Maximum of
# 65535): ~1 KB per order waiting to be decided, 19-21 MB measured for 20,000. The budget
# bounds that with room for a loaded machine; memory growing with the log's history (the
# idempotency record, the decided orders) would take it well past.
RSS_BUDGET_KB = 32 * 1024
SNAPSHOT_MAX_BYTES = 64 * 1024  # 50 live items; the digests of 20,000 orders would be 1.7 MB
FLOOD_S = 60.0


def rss_kb(pid: int, field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (the most it has been) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def decided(db: Path) -> int:
    """Orders with an outcome in the log so far (accepted or rejected), and none live."""
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as log_:
        (count,) = log_.execute(
            "SELECT count(*) FROM events WHERE type IN ('OrderAccepted', 'OrderRejected')"
        ).fetchone()
    log_.close()
    return int(count)


def test_a_flood_of_orders_to_a_default_mosquitto_loses_none_and_memory_stays_bounded(
    tmp_path: Path, agents: Agents
) -> None:
    with mosquitto(tmp_path / "mosquitto", defaults=True) as broker:
        device = unique("flood")
        config = agent_config(
            tmp_path / "agent",
            broker.port,
            device,
            settings={"speed": SPEED, "limits": {"max_open_items": MAX_OPEN, "min_free_mb": 0}},
        )
        db = events_db(config)
        ids = [f"f{n:05d}" for n in range(ORDERS)]
        bodies = tmp_path / "orders.jsonl"
        bodies.write_text(
            "".join(
                json.dumps({"order_id": i, "product_id": "widget-a", "qty": 1, "warehouse": "WH1"}) + "\n" for i in ids
            ),
            encoding="utf-8",
        )
        with Peer(broker.port, unique("watcher"), [status_topic(device)]) as watcher:
            agent = agents(config, "flood")
            watcher.wait_online(device)
            idle_kb = rss_kb(agent.process.pid, "VmRSS")

            with bodies.open("rb") as lines:
                subprocess.run(
                    ["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t", orders_topic(device), "-l"],
                    stdin=lines,
                    check=True,
                    timeout=FLOOD_S,
                )
            eventually(lambda: decided(db) >= ORDERS, "every order decided", FLOOD_S, agent)
            peak_kb = rss_kb(agent.process.pid, "VmHWM")
            rows = read_log(db)
            accepted = [r.subject for r in rows if r.type == "OrderAccepted"]
            eventually(
                lambda: len([r for r in read_log(db) if r.type == "TidiedUp"]) >= len(accepted),
                "every accepted order built and tidied up",
                FLOOD_S,
                agent,
            )
            agent.stop()

    rows = read_log(db)
    outcomes = Counter(r.subject for r in rows if r.type in ("OrderAccepted", "OrderRejected"))
    assert set(outcomes) == set(ids), f"lost: {len(set(ids) - set(outcomes))} orders"
    assert all(n == 1 for n in outcomes.values()), "an order was decided twice"
    reasons = Counter(json.loads(r.data)["reason"].split(":")[0] for r in rows if r.type == "OrderRejected")
    assert set(reasons) <= {"queue full"}, reasons
    accepted = [r.subject for r in rows if r.type == "OrderAccepted"]
    print(
        f"{ORDERS} orders: {len(accepted)} accepted and built, {sum(reasons.values())} rejected as queue full; "
        f"RSS {idle_kb / 1024:.1f} MB idle, at most {(peak_kb - idle_kb) / 1024:.1f} MB more"
    )
    assert len(accepted) >= MAX_OPEN
    for type_ in ("InventoryIssued", "TidiedUp"):
        counts = Counter(r.subject for r in rows if r.type == type_)
        assert counts == dict.fromkeys(accepted, 1), f"{type_} not once per accepted order"
    issued = [json.loads(r.data)["inventory_id"] for r in rows if r.type == "InventoryIssued"]
    assert issued == [inventory_id(n) for n in range(1, len(accepted) + 1)]
    assert not [r for r in rows if r.type == "OrderFailed"]
    assert peak_kb - idle_kb <= RSS_BUDGET_KB, f"RSS grew by {(peak_kb - idle_kb) / 1024:.1f} MB"
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as log_:
        (snapshot_bytes,) = log_.execute("SELECT length(state) FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
    log_.close()
    assert snapshot_bytes <= SNAPSHOT_MAX_BYTES
    check_intact(db)
