"""MQTT faults on a real Mosquitto: the agent killed between receipt
and commit or between commit and PUBACK, the broker killed and restarted during
a burst of orders, a fleet sharing one order queue, a broker that wants TLS and
a password, and a TLS link kept busy.

The agent runs in a child process (tests/support/mqtt_rig.py starts tests/support/mqtt_agent.py:
`serve(config)` with, for the crash modes, a SIGKILL patched in at the chosen point).
Its log is read read-only from here; the broker side is watched with paho clients of
the test's own. Waits are on MQTT messages or on the log's contents, with timeouts;
where another process writes a file, the file is polled.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.support.agent_process import AgentProcess, Agents
from tests.support.brokers import Mosquitto, mosquitto
from tests.support.mqtt_rig import (
    agent_config,
    all_tidied,
    check_each_once,
    check_intact,
    events_db,
    eventually,
    orders_topic,
    outbox_cursor,
    read_log,
    subjects,
    unique,
)
from tests.support.orders import PRODUCT_IDS, order, order_payload
from tests.support.peer import PREFIX, Peer, status_topic
from tests.support.pki import make_pki, run, tls_listener
from tests.support.ports import free_port
from tests.support.tools import tool

pytestmark = pytest.mark.slow

REFUSED = "the broker refused the connection"


# -- 1, 2: the agent killed around the commit ---------------------------------------------

ORDERS_PER_CRASH = 6


def test_agent_killed_between_receipt_and_commit_loses_no_order(
    tmp_path: Path, mosquitto_broker: Mosquitto, agents: Agents
) -> None:
    """SIGKILL once the last order has reached the group commit, before it commits: no
    PUBACK left for that batch, so the broker sends it again to the restarted agent
    (persistent session) and every order is done exactly once."""
    port = mosquitto_broker.port
    device = unique("precommit")
    config = agent_config(tmp_path / device, port, device)
    db = events_db(config)
    ids = [f"{device}-{n:02d}" for n in range(1, ORDERS_PER_CRASH + 1)]
    with Peer(port, "monitor", [status_topic(device)]) as monitor, Peer(port, "sender") as sender:
        crashing = agents(config, "crashing", "--crash-before-commit", str(len(ids)))
        monitor.wait_online(device)
        for n, order_id in enumerate(ids):
            sender.publish(orders_topic(device), order_payload(order(order_id, product=PRODUCT_IDS[n % 2])))
        crashing.wait_killed()

        (crash,) = crashing.reports("crash")
        assert crash["before"] == "commit"
        assert crash["offered"] == len(ids)
        lost_batch = set(crash["batch"])
        committed = set(subjects(read_log(db), "OrderAccepted"))
        assert lost_batch
        assert not lost_batch & committed, f"the crashing batch was committed: {lost_batch}"
        assert committed | lost_batch == set(ids)
        assert set(crashing.ids("acked")) == committed, "an order was acknowledged that is not in the log"

        restarted = agents(config, "restarted")
        eventually(all_tidied(db, ids), "every order tidied up after the restart", 30, restarted)
        again = [r for r in restarted.reports("received") if r["order_id"] in lost_batch]
        assert {r["order_id"] for r in again} == lost_batch, "the broker did not redeliver the uncommitted orders"
        assert all(r["dup"] for r in again), f"redeliveries without the DUP flag: {again}"
        assert lost_batch <= set(restarted.ids("acked"))
        restarted.stop()
    rows = read_log(db)
    check_each_once(rows, ids)
    check_intact(db)


@pytest.mark.parametrize("nth_ack", [1, 3])
def test_agent_killed_after_commit_before_puback_makes_no_second_work_item(
    tmp_path: Path, mosquitto_broker: Mosquitto, agents: Agents, nth_ack: int
) -> None:
    """SIGKILL after an order's commit, before its PUBACK leaves: the broker redelivers it,
    the restarted agent acknowledges the redelivery without a second work item."""
    port = mosquitto_broker.port
    device = unique("preack")
    config = agent_config(tmp_path / device, port, device)
    db = events_db(config)
    ids = [f"{device}-{n:02d}" for n in range(1, ORDERS_PER_CRASH + 1)]
    with Peer(port, "monitor", [status_topic(device)]) as monitor, Peer(port, "sender") as sender:
        crashing = agents(config, "crashing", "--crash-before-ack", str(nth_ack))
        monitor.wait_online(device)
        for n, order_id in enumerate(ids):
            sender.publish(orders_topic(device), order_payload(order(order_id, product=PRODUCT_IDS[n % 2])))
        crashing.wait_killed()

        (crash,) = crashing.reports("crash")
        assert crash["before"] == "ack"
        acked = set(crashing.ids("acked"))
        assert len(acked) == nth_ack - 1
        committed = set(subjects(read_log(db), "OrderAccepted"))
        assert crash["order_id"] in committed, "killed before the ack, yet the order is not in the log"
        unacked = committed - acked
        assert crash["order_id"] in unacked

        restarted = agents(config, "restarted")
        eventually(all_tidied(db, ids), "every order tidied up after the restart", 30, restarted)
        eventually(lambda: unacked <= set(restarted.ids("acked")), "the redeliveries acknowledged", 10, restarted)
        assert unacked <= set(restarted.ids("received")), "the broker did not redeliver the unacknowledged orders"
        restarted.stop()
    rows = read_log(db)
    assert set(subjects(rows, "OrderAccepted")) == set(ids)
    check_each_once(rows, ids)  # in particular, one OrderAccepted per order_id and no OrderRejected
    check_intact(db)


# -- 3: the broker killed during a burst ---------------------------------------------------

BURST = 100
PACE_S = 0.005  # the burst's rate (one order per 5 ms, ~0.5 s in all): not a synchronisation
KILL_AT = (25, 60)  # kill the broker once the agent has accepted this many orders


def accepted_at_least(db: Path, n: int) -> Callable[[], bool]:
    return lambda: len(subjects(read_log(db), "OrderAccepted")) >= n


def produced_after(db: Path, seq: int) -> Callable[[], bool]:
    """A unit built or a batch issued after `seq`: the cell is working."""
    return lambda: any(row.type in ("UnitBuilt", "InventoryIssued") for row in read_log(db) if row.seq > seq)


def received_all(agent: AgentProcess, ids: Sequence[str]) -> Callable[[], bool]:
    return lambda: set(agent.ids("received")) >= set(ids)


def test_broker_killed_twice_during_a_burst_loses_and_repeats_nothing(tmp_path: Path, agents: Agents) -> None:
    """100 orders while Mosquitto is SIGKILLed and restarted twice: the cell goes on
    building while the broker is away, every order is accepted and issued exactly once,
    and the outbox drains afterwards, in seq order.

    Mosquitto acknowledges a message before it saves it, so a SIGKILL can make it forget
    an order it has acknowledged but not yet handed over. No agent can help that; so the
    broker is killed between two of the sender's publishes, once the agent has received
    (not necessarily committed) every order the broker acknowledged."""
    # Save on every change, not once a second, so that the sessions and subscriptions survive the kills.
    with mosquitto(tmp_path / "mosquitto", "allow_anonymous true\nautosave_on_changes true") as broker:
        port = broker.port
        device = unique("burst")
        config = agent_config(tmp_path / device, port, device)
        db = events_db(config)
        ids = [f"{device}-{n:03d}" for n in range(1, BURST + 1)]
        events = f"{PREFIX}/{device}/events"
        stop = threading.Event()
        gate = threading.Lock()  # held by the test around a kill: no publish is under way then
        offline: list[tuple[int, int]] = []  # the log's head when the broker was killed, and restarted
        with (
            Peer(port, "events-watcher", [events], persistent=True) as watcher,
            Peer(port, "monitor", [status_topic(device)]) as monitor,
            Peer(port, "sender") as sender,
        ):
            agent = agents(config, "agent")
            monitor.wait_online(device)

            failed: list[BaseException] = []

            def burst() -> None:
                try:
                    for n, order_id in enumerate(ids):
                        if stop.wait(PACE_S):
                            return
                        with gate:
                            sender.publish(
                                f"{PREFIX}/orders",
                                order_payload(order(order_id, product=PRODUCT_IDS[n % 2])),
                                timeout=60,
                            )
                except BaseException as error:  # raised again on the test's thread
                    failed.append(error)

            publishing = threading.Thread(target=burst, name="burst", daemon=True)
            publishing.start()
            try:
                for accepted in KILL_AT:
                    eventually(accepted_at_least(db, accepted), f"{accepted} orders accepted", 30, agent)
                    with gate:
                        assert publishing.is_alive(), "the burst was over before the broker was killed"
                        acknowledged = ids[: sender.delivered]
                        eventually(received_all(agent, acknowledged), "acknowledged orders at the agent", 10, agent)
                        broker.kill()  # the sender's next order finds no broker: it must send it again
                    head = read_log(db)[-1].seq
                    eventually(produced_after(db, head), "production going on while the broker is down", 15, agent)
                    offline.append((head, read_log(db)[-1].seq))
                    broker.start()
                publishing.join(60)
            finally:
                stop.set()
            if failed:
                raise failed[0]
            assert not publishing.is_alive(), "the burst did not end"
            assert sender.delivered == BURST

            eventually(all_tidied(db, ids), "every order tidied up", 60, agent)
            last = read_log(db)[-1].seq
            eventually(lambda: outbox_cursor(db) == last, f"the outbox cursor at the last seq {last}", 20, agent)
            watcher.wait(lambda: last in {e["seq"] for e in watcher.payloads(events)}, f"seq {last} published", 20)
            agent.stop()
            seen = [e["seq"] for e in watcher.payloads(events)]
            assert {e["device_id"] for e in watcher.payloads(events)} == {device}

    rows = read_log(db)
    check_each_once(rows, ids)
    check_intact(db)
    firsts = list(dict.fromkeys(seen))  # each seq where it was first seen
    out_of_order = [(a, b) for a, b in itertools.pairwise(firsts) if b <= a]
    assert not out_of_order, f"events first seen out of seq order: {out_of_order[:10]}"
    # Mosquitto may lose events it acknowledged to the agent just before a kill; none committed later.
    last_kill = offline[-1][0]
    must = {seq for killed, restarted in offline for seq in range(killed + 1, restarted + 1)}
    must |= set(range(last_kill + 1, last + 1))
    missing = sorted(must - set(seen))
    assert not missing, f"events committed while the broker was away or after the last kill never published: {missing}"
    log_text = agent.log_text()
    assert log_text.count("connection to the broker lost") >= len(KILL_AT), "the agent did not see the broker go"
    assert log_text.count("connected to the broker at") >= len(KILL_AT) + 1, "the agent did not reconnect"


# -- 4: a fleet on one shared order queue ---------------------------------------------------

FLEET_ORDERS = 40


def test_shared_group_gives_each_order_to_exactly_one_device(
    tmp_path: Path, mosquitto_broker: Mosquitto, agents: Agents
) -> None:
    """Two agents in `mqtt.shared_group: cells` on one Mosquitto: 40 orders on factory/orders
    are each built by exactly one of them, and both get some."""
    port = mosquitto_broker.port
    devices = [unique("fleet"), unique("fleet")]
    configs = [agent_config(tmp_path / d, port, d, shared_group="cells") for d in devices]
    ids = [f"fleet-{uuid.uuid4().hex[:6]}-{n:02d}" for n in range(FLEET_ORDERS)]
    with Peer(port, "monitor", [f"{PREFIX}/+/status"]) as monitor, Peer(port, "sender") as sender:
        fleet = [agents(config, device) for config, device in zip(configs, devices, strict=True)]
        for device in devices:
            monitor.wait_online(device)
        for n, order_id in enumerate(ids):
            sender.publish(f"{PREFIX}/orders", order_payload(order(order_id, product=PRODUCT_IDS[n % 2])))

        def done() -> bool:
            tidied = [set(subjects(read_log(events_db(c)), "TidiedUp")) for c in configs]
            return set.union(*tidied) >= set(ids)

        eventually(done, "every order tidied up by one device or the other", 30, *fleet)
        for agent in fleet:
            agent.stop()
    logs = [read_log(events_db(config)) for config in configs]
    shares = [subjects(rows, "OrderAccepted") for rows in logs]
    overlap = set(shares[0]) & set(shares[1])
    assert not overlap, f"built by both devices: {sorted(overlap)}"
    assert set(shares[0]) | set(shares[1]) == set(ids)
    assert all(shares), f"one device got nothing: {[len(s) for s in shares]}"
    for rows, share in zip(logs, shares, strict=True):
        check_each_once(rows, list(share))


# -- 5: TLS and password -------------------------------------------------------------------


TLS_ORDERS = 20


def broker_errors(broker: Mosquitto) -> str:
    """What Mosquitto said went wrong (for an assertion's message)."""
    lines = (broker.folder / "mosquitto.log").read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(line for line in lines if "rror" in line or "disconnected" in line)


def refused_thrice(agent: AgentProcess) -> Callable[[], bool]:
    return lambda: agent.log_text().count(REFUSED) >= 3


def test_tls_and_password_let_the_right_agent_in_and_keep_the_others_out(tmp_path: Path, agents: Agents) -> None:
    """Mosquitto with TLS and a password file, no anonymous access: the agent with the CA
    and its password comes online and builds orders; one without credentials and one
    with a wrong password are refused, again and again, and never come online."""
    pki = make_pki(tmp_path / "pki")
    ca = pki[0]
    users = tmp_path / "mosquitto-passwords"
    passwd = tool("mosquitto_passwd", "mosquitto")
    run(passwd, "-b", "-c", str(users), "cell", "cell-secret", cwd=tmp_path)
    run(passwd, "-b", str(users), "monitor", "m-secret", cwd=tmp_path)
    extra = tls_listener(pki) + f"password_file {users}\nallow_anonymous false"
    right, wrong = tmp_path / "right-password", tmp_path / "wrong-password"
    right.write_text("cell-secret\n", encoding="utf-8")
    wrong.write_text("not-the-secret\n", encoding="utf-8")
    right.chmod(0o600)  # a password file others can read is refused
    wrong.chmod(0o600)
    tls = {"ca_file": str(ca)}

    with mosquitto(tmp_path / "mosquitto", extra) as broker:
        port = broker.port
        good, anonymous, mistaken = unique("tls-good"), unique("tls-anon"), unique("tls-wrong")
        good_config = agent_config(tmp_path / good, port, good, tls=tls, username="cell", password_file=str(right))
        refused = [
            agents(agent_config(tmp_path / anonymous, port, anonymous, tls=tls), "anonymous"),
            agents(
                agent_config(tmp_path / mistaken, port, mistaken, tls=tls, username="cell", password_file=str(wrong)),
                "mistaken",
            ),
        ]
        with (
            Peer(
                port, "monitor", [f"{PREFIX}/+/status"], ca_file=ca, username="monitor", password="m-secret"
            ) as monitor,
            Peer(port, "sender", ca_file=ca, username="monitor", password="m-secret") as sender,
        ):
            agent = agents(good_config, "good")
            monitor.wait_online(good)
            ids = [f"{good}-{n:02d}" for n in range(TLS_ORDERS)]
            for n, order_id in enumerate(ids):
                sender.publish(orders_topic(good), order_payload(order(order_id, product=PRODUCT_IDS[n % 2])))
            eventually(all_tidied(events_db(good_config), ids), "the orders built over TLS", 30, agent)
            for other in refused:  # refused, retried with backoff, refused again: a few seconds without getting in
                eventually(refused_thrice(other), f"{other.name} refused thrice", 20, other)
            for device in (anonymous, mistaken):
                assert monitor.states(device) == [], f"{device} came online: {monitor.states(device)}"
            agent.stop()
            for other in refused:
                assert "connected to the broker at" not in other.log_text()
                other.stop()
    check_each_once(read_log(events_db(good_config)), ids)


REBIRTHS = 400


def online_times(monitor: Peer, device_id: str, times: int) -> Callable[[], bool]:
    return lambda: monitor.states(device_id).count("online") >= times


def test_a_busy_tls_link_is_never_dropped(tmp_path: Path, agents: Agents) -> None:
    """The agent answers a storm of rebirth commands over TLS (a status and a state publish
    each, from the event loop, while paho's thread reads the next command): on a healthy
    broker and network its link stays up throughout and it is never reported offline.

    A regression test: while Link ran paho's loop_forever() on a thread of its own, paho
    also wrote to the socket directly from the thread calling publish() or ack(); the two
    writers corrupted the TLS connection ("decryption failed or bad record mac"), the
    broker dropped the link and sent the Last Will, and now and then the process died of
    the heap corruption ("free(): corrupted unsorted chunks"). This failed 9 runs in 10."""
    pki = make_pki(tmp_path / "pki")
    ca = pki[0]
    with mosquitto(tmp_path / "mosquitto", tls_listener(pki) + "allow_anonymous true") as broker:
        device = unique("tls-busy")
        config = agent_config(tmp_path / device, broker.port, device, tls={"ca_file": str(ca)})
        with Peer(broker.port, "monitor", [status_topic(device)], ca_file=ca) as monitor:
            agent = agents(config, "agent")
            monitor.wait_online(device)
            for _ in range(REBIRTHS):
                monitor.publish(f"{PREFIX}/{device}/cmd/rebirth", b"{}")
            eventually(online_times(monitor, device, REBIRTHS + 1), f"{REBIRTHS} rebirths answered", 30, agent)
            agent.stop()
        drops = agent.log_text().count("connection to the broker lost")
        assert drops == 0, f"the link was dropped {drops} times; the broker says:\n{broker_errors(broker)}"
        assert "offline" not in monitor.states(device)[:-1], "reported offline while it was running"


def healthz(port: int) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return int(response.status), list(json.loads(response.read())["reasons"])
    except urllib.error.HTTPError as error:
        return int(error.code), list(json.loads(error.read())["reasons"])
    except urllib.error.URLError:
        return 0, []  # not listening yet


def unhealthy_naming(port: int, words: Sequence[str]) -> Callable[[], bool]:
    def check() -> bool:
        status, reasons = healthz(port)
        return status == 503 and any(all(word in reason for word in words) for reason in reasons)

    return check


# Well inside the minute a lost connection may last before it makes the agent unhealthy.
AT_ONCE_S = 15.0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_wrong_password_is_named_in_the_log_and_in_healthz_at_once(
    tmp_path: Path, agents: Agents, protocol: str
) -> None:
    users = tmp_path / "mosquitto-passwords"
    run(tool("mosquitto_passwd", "mosquitto"), "-b", "-c", str(users), "cell", "cell-secret", cwd=tmp_path)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-secret\n", encoding="utf-8")
    wrong.chmod(0o600)  # a password file others can read is refused before any connection
    with mosquitto(tmp_path / "mosquitto", f"password_file {users}\nallow_anonymous false") as broker:
        device, http = unique("bad-password"), free_port()
        settings = {"http": {"enabled": True, "port": http}}
        config = agent_config(
            tmp_path / device,
            broker.port,
            device,
            settings=settings,
            username="cell",
            password_file=str(wrong),
            protocol=protocol,
        )
        agent = agents(config, "agent")
        words = ("the broker refused the connection", "Not authorized")
        eventually(unhealthy_naming(http, words), "/healthz naming the refusal", AT_ONCE_S, agent)
        lines = [line for line in agent.log_text().splitlines() if all(word in line for word in words)]
        assert lines, agent.log_text()
        agent.stop()


def test_a_missing_client_certificate_is_named_in_the_log_and_in_healthz_at_once(
    tmp_path: Path, agents: Agents
) -> None:
    pki = make_pki(tmp_path / "pki")
    extra = tls_listener(pki) + "require_certificate true\nallow_anonymous true"
    with mosquitto(tmp_path / "mosquitto", extra) as broker:
        device, http = unique("no-cert"), free_port()
        settings = {"http": {"enabled": True, "port": http}}
        config = agent_config(tmp_path / device, broker.port, device, settings=settings, tls={"ca_file": str(pki[0])})
        agent = agents(config, "agent")
        words = ("client certificate", "mqtt.tls.cert_file")
        eventually(unhealthy_naming(http, words), "/healthz naming the certificate", AT_ONCE_S, agent)

        def logged() -> bool:  # the line follows the refusal /healthz reports, a moment later
            return any(all(word in line for word in words) for line in agent.log_text().splitlines())

        eventually(logged, "the log naming the certificate", AT_ONCE_S, agent)
        agent.stop()


def test_a_refused_cancel_is_acknowledged_and_not_sent_again_after_a_restart(tmp_path: Path, agents: Agents) -> None:
    """A cancel for an order that is not there (or already finished) is refused, answered,
    and acknowledged: the broker does not send it again after a reconnect, where it would
    hold one of the Receive Maximum slots every time."""
    with mosquitto(tmp_path / "mosquitto") as broker:
        device = unique("refused-cancel")
        config = agent_config(tmp_path / device, broker.port, device)
        cancel_topic = f"{PREFIX}/{device}/cmd/cancel"
        rejected = f"{PREFIX}/{device}/orders/rejected"
        with Peer(broker.port, "back-office", [status_topic(device), rejected]) as office:
            first = agents(config, "first")
            office.wait_online(device)
            office.publish(orders_topic(device), order_payload(order("finished")))
            eventually(all_tidied(events_db(config), ["finished"]), "the order built", 30, first)
            for order_id in ("no-such-order", "finished"):
                office.publish(cancel_topic, json.dumps({"order_id": order_id}).encode())
            office.wait(lambda: len(office.payloads(rejected)) == 2, "both cancels refused")
            assert [answer["order_id"] for answer in office.payloads(rejected)] == ["no-such-order", "finished"]
            first.stop()

            second = agents(config, "second")
            office.wait_online(device, times=2)
            office.publish(orders_topic(device), order_payload(order("after-restart")))  # comes after any redelivery
            eventually(all_tidied(events_db(config), ["after-restart"]), "the next order built", 30, second)
            second.stop()
        assert [r["topic"] for r in first.reports("received")].count(cancel_topic) == 2
        assert [r["topic"] for r in second.reports("received")] == [orders_topic(device)], "a cancel came again"
