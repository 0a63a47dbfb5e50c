"""Chaos: Mosquitto SIGKILLed and restarted every few seconds while 300 orders go
through it ("broker down / network flapping: keeps producing; reconnects;
nothing lost or duplicated in the work; outbox drains after").

The broker is up for a random 1-3 s, killed with SIGKILL, down for a random 0-0.5 s,
started again on the same port, and so on, drawn from a seeded random.Random (printed;
CHAOS_SEED=... runs it again), until the sender has seen the outcome of every order.
Two brokers: one that saves its state once a second (the rig's `autosave_interval 1`)
and starts again from it, and one that keeps nothing (`persistence false`, Mosquitto's
own default), so every restart forgets every session, subscription and queued
message. Either way Mosquitto acknowledges a publish before it has saved it, so a
kill can make it forget an order it acknowledged, an outcome the agent published, a
queued message. No device can help that: the sender has to.

The sender does what the contract leaves a publisher to do. It publishes each order at
QoS 1 and sends it again whenever no PUBACK came within RESEND_S (the rig's Peer). It
watches the device's inventory, orders/rejected and events topics for the order's
outcome (an inventory record, a rejection, an OrderFailed), and sends the order again,
the same body under the same order_id, whenever it has seen no outcome for
OUTCOME_WAIT_S since it last sent it: the broker may have lost the order, or the
outcome. That is safe because the order_id is the idempotency key: a resent order makes
no second work item and changes nothing. The device does not publish a finished order's
outcome again (the contract: a duplicate is acknowledged, nothing re-published), so before
it sends again the sender reads the outcomes the broker may have lost from the device's
log, as an operator would with `edge-agent log show`. The sender consumes outcomes
deduplicated by order_id (an inventory record may come more than once, always with the
same inventory_id).

Asserted: 0 lost (every order accepted, built, issued and tidied up, and its inventory
record seen by the sender, on MQTT or in the log), 0 duplicate work (OrderAccepted, InventoryIssued and
TidiedUp exactly once per order; inventory ids INV00001.. without a gap or repeat; each
order's records all name the inventory id of its one InventoryIssued), and `log verify`
passes.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support import chaos_seed
from tests.support.agent_process import Agents
from tests.support.brokers import mosquitto
from tests.support.mqtt_rig import (
    agent_config,
    all_tidied,
    check_each_once,
    check_intact,
    events_db,
    eventually,
    orders_topic,
    read_log,
    unique,
)
from tests.support.orders import PRODUCT_IDS, order, order_payload
from tests.support.peer import PREFIX, Peer, status_topic

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

ORDERS = 300
PACE_S = 0.1  # the sender's rate when the broker lets it: ~30 s of orders, a dozen kills or more
UP_S = (1.0, 3.0)  # the broker runs this long between two kills
DOWN_S = (0.0, 0.5)  # and is away this long
OUTCOME_WAIT_S = 5.0  # the sender sends an order again after this long without its outcome
CHECK_S = 0.25  # how often the sender looks at what has come in once every order is out
SENDER_DEADLINE_S = 240.0
MIN_RESTARTS = 12
BROKERS = {  # what a restarted Mosquitto remembers, as settings added to the rig's
    "saved-every-second": "allow_anonymous true",
    "remembers-nothing": "allow_anonymous true\npersistence false",  # the last `persistence` line wins
}


class Sender:
    """The back-office publisher of the module docstring; `run` on a thread of its own."""

    def __init__(self, device: str, ids: Sequence[str], db: Path) -> None:
        self.ids = list(ids)
        self._db = db
        self.from_log: dict[str, str] = {}  # order id -> inventory id, for outcomes the broker lost
        self._number = {order_id: n for n, order_id in enumerate(ids)}
        self._orders = orders_topic(device)
        self._inventory = f"{PREFIX}/{device}/inventory"
        self._rejected = f"{PREFIX}/{device}/orders/rejected"
        self._events = f"{PREFIX}/{device}/events"
        self.topics = (self._inventory, self._rejected, self._events)
        self.sends: Counter[str] = Counter()
        self._last_sent: dict[str, float] = {}
        self.records: defaultdict[str, list[str]] = defaultdict(list)  # order id -> inventory ids, as received
        self.went_wrong: dict[str, str] = {}  # order id -> the rejection or failure seen
        self._read = 0  # messages of the watcher looked at so far
        self.finished = threading.Event()  # every order has an outcome, or the sender failed
        self.error: BaseException | None = None

    def run(self, out: Peer, watcher: Peer, stop: threading.Event) -> None:
        try:
            deadline = time.monotonic() + SENDER_DEADLINE_S
            for order_id in self.ids:
                if stop.wait(PACE_S):
                    return
                self._send(out, order_id)
                self._resend_stale(out, watcher)
            while self._waiting(watcher):
                if time.monotonic() > deadline:
                    missing = self._waiting(watcher)
                    raise AssertionError(f"no outcome within {SENDER_DEADLINE_S} s for {len(missing)}: {missing}")
                if stop.wait(CHECK_S):
                    return
                self._resend_stale(out, watcher)
        except BaseException as error:  # raised again on the test's thread
            self.error = error
        finally:
            self.finished.set()

    def _send(self, out: Peer, order_id: str) -> None:
        out.publish(self._orders, order_payload(order(order_id, product=PRODUCT_IDS[self._number[order_id] % 2])))
        self.sends[order_id] += 1
        self._last_sent[order_id] = time.monotonic()

    def _resend_stale(self, out: Peer, watcher: Peer) -> None:
        now = time.monotonic()
        stale = [o for o in self._waiting(watcher) if now - self._last_sent.get(o, now) > OUTCOME_WAIT_S]
        if stale:  # the broker may have lost their outcomes: the log has them
            issued = {row.subject: row.data for row in read_log(self._db) if row.type == "InventoryIssued"}
            self.from_log |= {o: json.loads(issued[o])["inventory_id"] for o in stale if o in issued}
        for order_id in stale:
            if order_id not in self.from_log:
                self._send(out, order_id)

    def _waiting(self, watcher: Peer) -> list[str]:
        """The orders whose outcome it has not seen yet."""
        news = watcher.messages(since=self._read)
        self._read += len(news)
        for received in news:
            message = received.json()
            if received.topic == self._inventory:
                self.records[message["order_id"]].append(message["inventory_id"])
            elif received.topic == self._rejected:
                self.went_wrong[message["order_id"]] = f"rejected: {message['reason']}"
            elif message["type"] == "OrderFailed":
                self.went_wrong[message["subject"]] = f"failed: {message['data']['reason']}"
        return [o for o in self.ids if o not in self.records and o not in self.went_wrong and o not in self.from_log]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("memory", list(BROKERS))
def test_broker_killed_every_few_seconds_loses_no_order_and_repeats_no_work(
    tmp_path: Path, agents: Agents, memory: str
) -> None:
    """300 orders while Mosquitto is SIGKILLed and restarted every 1-3 s: each is done
    exactly once and its inventory record reaches the sender; the log is intact."""
    seed = chaos_seed()
    rng = random.Random(seed)
    with mosquitto(tmp_path / "mosquitto", BROKERS[memory]) as broker:
        port = broker.port
        device = unique("chaos-broker")
        config = agent_config(tmp_path / device, port, device)
        db = events_db(config)
        ids = [f"{device}-{n:03d}" for n in range(ORDERS)]
        sender = Sender(device, ids, db)
        stop = threading.Event()
        restarts = 0
        with (
            Peer(port, "monitor", [status_topic(device)]) as monitor,
            Peer(port, "watcher", sender.topics, persistent=True) as watcher,
            Peer(port, "sender") as out,
        ):
            agent = agents(config, "agent")
            monitor.wait_online(device)  # subscribed, in a persistent session
            started = time.monotonic()
            sending = threading.Thread(target=sender.run, args=(out, watcher, stop), name="sender", daemon=True)
            sending.start()
            try:
                while not sender.finished.wait(rng.uniform(*UP_S)):
                    agent.check_alive()
                    broker.kill()
                    restarts += 1
                    time.sleep(rng.uniform(*DOWN_S))  # a random outage: nothing to wait for
                    broker.start()
            finally:
                stop.set()
                sending.join(30)
            if sender.error is not None:
                raise sender.error
            sent = time.monotonic()
            eventually(all_tidied(db, ids), "every order tidied up", 30, agent)
            agent.stop()
    done = time.monotonic()
    resent = {o: n - 1 for o, n in sender.sends.items() if n > 1}
    log_text = agent.log_text()
    print(
        f"{ORDERS} orders, {restarts} broker kills in {sent - started:.0f} s (then {done - sent:.0f} s to stop); "
        f"{sum(resent.values())} resends of {len(resent)} orders; "
        f"{sum(map(len, sender.records.values())) + len(sender.from_log) - ORDERS} inventory records received again, "
        f"{len(sender.from_log)} read from the log; "
        f"the agent lost its connection {log_text.count('connection to the broker lost')} times"
    )

    assert not sender.went_wrong, f"orders rejected or failed: {sender.went_wrong}"
    rows = read_log(db)
    check_each_once(rows, ids)
    check_intact(db)
    issued = {row.subject: json.loads(row.data)["inventory_id"] for row in rows if row.type == "InventoryIssued"}
    mismatched = {o: r for o, r in sender.records.items() if set(r) != {issued[o]}}
    mismatched |= {o: [r] for o, r in sender.from_log.items() if r != issued[o]}
    assert not mismatched, f"inventory records that name another inventory id than the log: {mismatched}"
    assert restarts >= MIN_RESTARTS, f"only {restarts} broker kills: the orders went through too fast"
    assert log_text.count("connection to the broker lost") >= restarts // 2, "the agent did not see the broker go"
