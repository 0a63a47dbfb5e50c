"""Orders are idempotent through the log's indexed record of every order id: a duplicate
adds nothing, a conflict is rejected, past `limits.max_open_items` an order is rejected as
queue full, and the snapshots follow the live items, not the history."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import urllib.request
from pathlib import Path

import orjson

from edge_agent import service
from edge_agent.agent import Agent
from edge_agent.clock import FakeClock
from edge_agent.demo import demo_orders
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.gateway import Gateway
from edge_agent.health import HealthServer
from edge_agent.log.compact import Retention, compact
from edge_agent.log.journal import Journal
from edge_agent.log.store import APPLICATION_ID, OUTBOX_CURSOR, EventLog
from edge_agent.log.verify import verify
from edge_agent.mqtt.inbound import order_command
from edge_agent.workflow.engine import Workflow
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order
from tests.support.plant import PRODUCTS, STATIONS


def workflow(path: Path, clock: FakeClock, *, max_open_items: int | None = None) -> tuple[Journal, Workflow]:
    journal = Journal.open(path, clock=clock, snapshot_every=50)
    flow = Workflow(journal, clock, max_open_items=max_open_items)
    flow.execute(cmd.ConfigurePlant(STATIONS, PRODUCTS))
    return journal, flow


def finish(journal: Journal, order_ids: list[str]) -> None:
    """Take the orders (just accepted) to their end: cancelled and tidied up."""
    journal.append([e for order_id in order_ids for e in (ev.OrderCancelled(order_id), ev.TidiedUp(order_id))])


def types(records: list[ev.Recorded]) -> list[str]:
    return [type(r.event).__name__ for r in records]


def test_a_duplicate_is_answered_from_the_record_after_the_order_ended_a_restart_and_compaction(
    tmp_path: Path,
) -> None:
    path, clock = tmp_path / "events.db", FakeClock()
    journal, flow = workflow(path, clock)
    assert types(flow.execute(order("o1"))) == ["OrderAccepted"]
    finish(journal, ["o1"])
    assert "o1" not in journal.state.work_items
    assert flow.execute(order("o1")) == []
    assert flow.duplicates == 1
    journal.close()

    journal, flow = workflow(path, clock)  # a restart
    assert flow.execute(order("o1")) == []
    (rejected,) = flow.execute(order("o1", qty=2))  # the same id with another body
    assert isinstance(rejected.event, ev.OrderRejected)
    assert "conflicting duplicate" in rejected.event.reason
    journal.append([ev.AgentStopped("test")] * 60)  # past a snapshot, so that compaction removes o1's events
    journal.close()

    with EventLog(path) as log_:
        log_.save_cursor(OUTBOX_CURSOR, log_.head().seq)  # the broker has every event
        assert compact(log_, Retention.drop, tmp_path / "archive").removed > 0
        assert list(log_.rows(subject="o1")) == []
    journal, flow = workflow(path, clock)
    head = journal.state.last_seq
    assert flow.execute(order("o1")) == []  # still known: the record outlives the events
    assert journal.state.last_seq == head  # and nothing was logged for it
    journal.close()


def test_an_id_twice_in_one_batch_is_one_work_item(tmp_path: Path) -> None:
    journal, flow = workflow(tmp_path / "events.db", FakeClock())
    conflicting = order("o1", qty=2)
    records = flow.execute_batch([order("o1"), order("o2"), order("o1"), conflicting])
    assert types(records) == ["OrderAccepted", "OrderAccepted", "OrderRejected"]
    assert flow.duplicates == 1
    assert sorted(journal.state.work_items) == ["o1", "o2"]
    journal.close()


def test_past_max_open_items_a_new_order_is_rejected_as_queue_full_and_a_duplicate_is_still_one(
    tmp_path: Path,
) -> None:
    journal, flow = workflow(tmp_path / "events.db", FakeClock(), max_open_items=2)
    records = flow.execute_batch([order("o1"), order("o2"), order("o3"), order("o1")])
    assert types(records) == ["OrderAccepted", "OrderAccepted", "OrderRejected"]
    assert records[2].event == ev.OrderRejected("o3", "queue full: 2 open")
    assert flow.duplicates == 1
    finish(journal, ["o1"])  # room again
    assert types(flow.execute(order("o3"))) == ["OrderAccepted"]
    journal.close()


def test_a_snapshot_after_20000_finished_orders_is_a_few_kb(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with Journal.open(path, clock=FakeClock(), snapshot_every=1000) as journal:
        journal.append([ev.PlantConfigured(STATIONS, PRODUCTS)])
        for batch in range(20):
            ids = [f"o{batch * 1000 + n}" for n in range(1000)]
            journal.append([ev.OrderAccepted(i, "widget-a", 1, "WH1", 0, f"d-{i}") for i in ids])
            finish(journal, ids)
        assert journal.state.accepted == 20_000
        assert journal.known_orders(["o0", "o19999", "nope"]) == {"o0": "d-o0", "o19999": "d-o19999"}
    with sqlite3.connect(path) as db:
        seq, size = db.execute("SELECT seq, length(state) FROM snapshots ORDER BY seq DESC LIMIT 1").fetchone()
        outcomes = dict(db.execute("SELECT outcome, count(*) FROM orders GROUP BY outcome").fetchall())
    assert seq > 55_000
    assert size < 4096, f"the newest snapshot is {size} bytes"
    assert outcomes == {"Cancelled": 20_000}


def test_resending_a_demo_orders_exact_body_over_mqtt_is_a_duplicate(tmp_path: Path) -> None:
    config = agent_config(tmp_path / "var", device_id="demo-test", speed=50)

    async def scenario() -> None:
        async with Agent(config) as agent, running(agent):
            (demo,) = demo_orders(1, agent.profile)
            assert types(await agent.submit(demo)) == ["OrderAccepted"]
            body = {
                "order_id": demo.order_id,
                "product_id": demo.product_id,
                "qty": demo.qty,
                "warehouse": demo.warehouse,
                "priority": demo.priority,
            }
            resent = order_command(orjson.dumps(body), dict(agent.state.products.items()), 65536)
            assert await agent.submit(resent) == []  # acknowledged as a duplicate, nothing logged
            assert agent.workflow.duplicates == 1

    asyncio.run(scenario())


def test_a_duplicate_is_counted_in_metrics(tmp_path: Path) -> None:
    config = agent_config(tmp_path / "var", device_id="metrics-test")

    async def scenario() -> str:
        async with Agent(config) as agent, running(agent):
            server = HealthServer("127.0.0.1", 0, list, service.metrics(agent, Gateway(agent, config)))
            server.start()
            try:
                assert types(await agent.submit(order("o1"))) == ["OrderAccepted"]
                assert await agent.submit(order("o1")) == []
                url = f"http://127.0.0.1:{server.port}/metrics"
                return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            finally:
                server.stop()

    metrics = asyncio.run(scenario())
    assert "edge_agent_orders_duplicate_total 1.0" in metrics
    assert "edge_agent_orders_accepted_total 1.0" in metrics


def legacy(path: Path) -> None:
    """Turn a log into one written before the idempotency record left the state: no
    `orders` table, no label, and every snapshot holding the ids accepted up to it, with
    their digests, in an `orders` map."""
    with sqlite3.connect(path) as db:
        for seq, text in db.execute("SELECT seq, state FROM snapshots").fetchall():
            state = orjson.loads(text)
            del state["accepted"], state["format"]  # snapshot format 1: items by position, no workflow
            workflow = state.pop("item_fields").index("workflow")
            state["work_items"] = [row[:workflow] for row in state["work_items"]]
            rejected = state.pop("rejected")
            ids = db.execute("SELECT order_id, digest FROM orders WHERE accepted_seq <= ?", (seq,)).fetchall()
            state |= {"orders": dict(ids), "rejected": rejected}
            text = orjson.dumps(state).decode()
            checksum = hashlib.sha256(text.encode()).hexdigest()
            db.execute("UPDATE snapshots SET state = ?, checksum = ? WHERE seq = ?", (text, checksum, seq))
        db.execute("DROP TABLE orders")
        db.execute("DELETE FROM schema_migrations WHERE name = '0005_orders'")
        db.execute("PRAGMA application_id = 0")


def test_a_log_from_before_the_record_is_verified_as_it_is_and_backfilled_when_opened(tmp_path: Path) -> None:
    """Its old snapshots load and `log verify` finds nothing wrong with them; opened for
    writing it gains the record, from the events and, where compaction removed them,
    from the newest snapshot. A demo order of then (its digest of another format) is a
    duplicate of the same body sent today."""
    demo = order("demo-0001", qty=2)
    whole, compacted = tmp_path / "whole.db", tmp_path / "compacted.db"
    with Journal.open(whole, clock=FakeClock(), snapshot_every=50) as journal:
        journal.append([ev.PlantConfigured(STATIONS, PRODUCTS)])
        journal.append([ev.OrderAccepted(demo.order_id, "widget-a", 2, "WH1", 0, "widget-a|2|WH1|0")])
        journal.append([ev.OrderAccepted("m1", "widget-a", 1, "WH1", 0, order("m1").digest)])
        finish(journal, ["demo-0001", "m1"])
        journal.append([ev.AgentStopped("test")] * 60)  # a snapshot
        journal.append([ev.OrderAccepted("m2", "widget-a", 1, "WH1", 0, order("m2").digest)])
    compacted.write_bytes(whole.read_bytes())
    with EventLog(compacted) as log_:
        log_.save_cursor(OUTBOX_CURSOR, log_.head().seq)  # the broker has every event
        assert compact(log_, Retention.drop, tmp_path / "archive").removed > 0
    for path in (whole, compacted):
        legacy(path)
        with EventLog(path, readonly=True) as log_:
            assert verify(log_).fault is None
            snapshot = log_.latest_snapshot()
            assert snapshot is not None
            assert snapshot.state.accepted == 2
        clock = FakeClock()
        journal, flow = workflow(path, clock)
        assert journal.state.accepted == 3
        assert set(journal.known_orders(["demo-0001", "m1", "m2"])) == {"demo-0001", "m1", "m2"}
        assert flow.execute_batch([demo, order("m1"), order("m2")]) == []
        assert flow.duplicates == 3
        journal.close()
        with EventLog(path, readonly=True) as log_:
            assert verify(log_).fault is None
        assert int.from_bytes(path.read_bytes()[68:72], "big") == APPLICATION_ID
