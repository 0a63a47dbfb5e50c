"""Chaos: the agent SIGKILLed over and over while orders stream in over a real Mosquitto
(the promise: "kill -9 at any moment: every accepted order resumes and reaches a
terminal stage exactly once; no inventory id repeats or is skipped").

One agent (tests/support/mqtt_agent.py: `serve(config)` on the simulated profile) is
started on the same data dir again and again, and killed from here with a real SIGKILL
each time, at a moment drawn from a seeded random.Random (printed; CHAOS_SEED=... runs
it again): uniformly within KILL_WINDOW_S of the run's AgentStarted, so it lands in
recovery, in the ingest of a burst, mid-build, mid-shipment or while idle, wherever the
cell has got to. A sender publishes the orders meanwhile, at QoS 1 (again whenever no
PUBACK came), to the device's order topic: some while the agent is down (the broker
keeps them in the agent's persistent session and sends them as one burst when it
connects), some as a burst timed just before the kill, and now and then an order it
has already sent (a sender's retry: idempotent by order_id). After the last kill the
agent runs until every order is tidied up.

After every kill: `log verify` passes, and what the next run will recover (newest
snapshot plus the tail) equals the fold of every event from seq 1. At the end: every
order was accepted, issued and tidied up exactly once, with its units built once each;
inventory ids run INV00001.. without a gap; every state the agent itself published on
its state topic (each run's once it connected, as it had recovered it, and the last
run's at the end) equals the fold of the log from seq 1 to that state's seq;
`edge-agent status --json` equals a fresh fold of the whole log; `edge-agent log
verify` passes; and the kills did land in each of the phases named in PHASES.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.domain.events import Recorded
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import Stage, State, inventory_id
from edge_agent.domain.view import state_view
from edge_agent.log.journal import replay
from edge_agent.log.store import EventLog, Row
from edge_agent.log.verify import verify
from tests.support import ROOT, chaos_seed
from tests.support.agent_process import AgentProcess, Agents
from tests.support.brokers import Mosquitto
from tests.support.crash_writer import canonical
from tests.support.mqtt_rig import (
    agent_config,
    all_tidied,
    events_db,
    eventually,
    orders_topic,
    read_log,
    subjects,
    unique,
)
from tests.support.orders import PRODUCT_IDS, order, order_payload
from tests.support.peer import PREFIX, Peer, status_topic

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

KILLS = 105
ORDERS = 310
# 20x: a unit takes 0.05 s, a transit 0.15 s, so a few orders are in each phase at any
# moment; the unit timeout (0.5 s) stays well above what a busy 2-core machine delays.
SPEED = 20
SNAPSHOT_EVERY = 50  # many snapshots: most recoveries start from one, not from seq 1
KILL_WINDOW_S = 1.0  # a kill lands uniformly within this of the run's AgentStarted
QUEUED_MAX = 3  # new orders published while a run starts (delivered as a burst when it connects)
BURST_P, BURST_SIZES = 0.3, (4, 12)  # a run gets a burst this often, of this many new orders
AIM_S = 0.015  # a burst goes out at most this long before the kill: some kills land in its ingest
RETRY_P = 0.2  # how often the sender sends again an order it has sent before
ONCE_PER_ORDER = ("OrderAccepted", "StationAssigned", "BuildComplete", "InventoryIssued", "TidiedUp")
# Where the cell was when a kill landed; each must have been hit at least MIN_HITS times.
PHASES = ("ingest", "waiting", "mid-build", "mid-shipment")
MIN_HITS = 3


# -- the plan: what is published when, and when each run is killed --------------------------


@dataclass(frozen=True)
class Run:
    """One run of the agent. Order numbers in `queued` are published as it starts, those in
    `burst` `burst_at` s after its AgentStarted; it is killed `kill_at` s after that."""

    queued: tuple[int, ...]
    burst: tuple[int, ...]
    burst_at: float
    kill_at: float


def plan(rng: random.Random) -> tuple[list[Run], tuple[int, ...]]:
    """The runs to kill, and the orders left to publish before the last run: on average the
    runs take ~400 orders, so all ORDERS are placed by about the 80th run (rarely, none
    are left for the last run's start)."""
    runs = []
    sent = 0

    def new(count: int) -> tuple[int, ...]:
        nonlocal sent
        numbers = tuple(range(sent, min(ORDERS, sent + count)))
        sent += len(numbers)
        return numbers

    for _ in range(KILLS):
        kill_at = rng.uniform(0.0, KILL_WINDOW_S)
        queued = new(rng.randint(0, QUEUED_MAX))
        if sent and rng.random() < RETRY_P:
            queued += (rng.randrange(sent),)
        burst: tuple[int, ...] = ()
        burst_at = 0.0
        if rng.random() < BURST_P:
            burst, burst_at = new(rng.randint(*BURST_SIZES)), max(0.0, kill_at - rng.uniform(0.0, AIM_S))
        runs.append(Run(queued, burst, burst_at, kill_at))
    return runs, new(ORDERS)


def order_id(device: str, n: int) -> str:
    return f"{device}-{n:03d}"


def qty(n: int) -> int:
    return 1 + n % 3


# -- watching the log while the agent is down --------------------------------------------------


def started_after(db: Path, seq: int) -> Callable[[], bool]:
    """A run has recovered the log and logged its start after `seq`."""

    def check() -> bool:
        with EventLog(db, readonly=True) as log_:
            return next(log_.rows(seq + 1, type_="AgentStarted", limit=1), None) is not None

    return check


def phases(state: State, agent: AgentProcess) -> set[str]:
    """Where the cell was at the kill: orders received but not acknowledged, items waiting
    for a station, on a station, on the lane."""
    found = set()
    received = {r["mid"] for r in agent.reports("received") if r["topic"].endswith("/orders")}
    if received - {r["mid"] for r in agent.reports("acked")}:
        found.add("ingest")
    stages = {item.stage for item in state.work_items.values()}
    if stages & {Stage.NEW, Stage.FACTORY_READY}:
        found.add("waiting")
    if Stage.FACTORY_ACCEPTED in stages:
        found.add("mid-build")
    if state.lane.order_id is not None:
        found.add("mid-shipment")
    if not stages:
        found.add("idle")
    return found


@dataclass
class Follower:
    """The fold of the log from seq 1, carried forward kill by kill."""

    db: Path
    state: State

    def after_kill(self) -> State:
        """The log must be intact, and the next run's recovery must equal the fold from seq 1."""
        with EventLog(self.db, readonly=True) as log_:
            verdict = verify(log_)
            assert verdict.fault is None, f"log verify after a kill: {verdict.fault}"
            self.state = fold(self.state, [row.decode() for row in log_.rows(self.state.last_seq + 1)])
            recovered = replay(log_)
        assert canonical(recovered) == canonical(self.state), "the recovery from the snapshot differs from the fold"
        return self.state


# -- the final checks ----------------------------------------------------------------------------


def check_every_order_once(rows: Sequence[Row], ids: Sequence[str]) -> None:
    """Accepted, stationed, built, issued and tidied up exactly once; each unit built once;
    every workflow step completed once; no order rejected, failed or cancelled."""
    for type_ in ONCE_PER_ORDER:
        counts = subjects(rows, type_)
        wrong = {o: counts[o] for o in set(ids) | set(counts) if counts[o] != 1}
        assert not wrong, f"{type_} not exactly once per order: {wrong}"
    trouble = [(r.seq, r.type, r.subject, r.data) for r in rows if r.type in ("OrderRejected", "OrderFailed")]
    assert not trouble, f"orders went wrong: {trouble}"
    units = subjects(rows, "UnitBuilt")
    assert units == {o: qty(n) for n, o in enumerate(ids)}, "units counted twice or lost"
    steps = Counter((r.subject, json.loads(r.data)["step"]) for r in rows if r.type == "StepCompleted")
    assert all(n == 1 for n in steps.values()), f"a step done twice: {[k for k, n in steps.items() if n > 1]}"
    issued = [json.loads(r.data)["inventory_id"] for r in rows if r.type == "InventoryIssued"]
    assert issued == [inventory_id(n) for n in range(1, len(ids) + 1)], f"inventory ids skip or repeat: {issued}"


def state_topic(device: str) -> str:
    return f"{PREFIX}/{device}/state"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    command = [sys.executable, "-m", "edge_agent", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def rebirth(monitor: Peer, device: str) -> None:
    """Have the agent publish its live state now, and wait until it has come."""
    topic = state_topic(device)
    before = len(monitor.payloads(topic))
    monitor.publish(f"{PREFIX}/{device}/cmd/rebirth", b"{}")
    monitor.wait(lambda: len(monitor.payloads(topic)) > before, "the state published on a rebirth", 20)


def timeless(view: dict[str, Any]) -> dict[str, Any]:
    """A state view without what depends on the moment it was taken (how long items have
    waited or built so far), in its JSON form."""
    items = [{k: v for k, v in item.items() if k not in ("wait_s", "build_s")} for item in view["work_items"]]
    plain: dict[str, Any] = json.loads(json.dumps({**view, "work_items": items}))
    return plain


def check_reported(views: Sequence[dict[str, Any]], device: str, records: Sequence[Recorded]) -> None:
    """Each state the agent published (every run's, once it connected, as it had recovered it
    and gone on from there) equals the fold of the log from seq 1 up to that state's seq."""
    state = State()
    for view in sorted(views, key=lambda v: int(v["last_seq"])):
        assert view["device_id"] == device
        state = fold(state, records[state.last_seq : view["last_seq"]])
        reported = timeless({k: v for k, v in view.items() if k != "device_id"})
        assert reported == timeless(state_view(state)), f"the state the agent reported at seq {state.last_seq}"


# -- the test --------------------------------------------------------------------------------------


@pytest.mark.timeout(420)
def test_agent_killed_a_hundred_times_does_every_order_exactly_once(
    tmp_path: Path, mosquitto_broker: Mosquitto, agents: Agents
) -> None:
    """105 SIGKILLs at random moments across 310 orders arriving over MQTT: no order lost
    or done twice, the log intact and equal to its replay after every kill and at the end."""
    seed = chaos_seed()
    rng = random.Random(seed)
    runs, leftover = plan(rng)
    port = mosquitto_broker.port
    device = unique("chaos-kills")
    settings = {"speed": SPEED, "log": {"snapshot_every": SNAPSHOT_EVERY}}
    config = agent_config(tmp_path / device, port, device, settings=settings)
    db = events_db(config)
    ids = [order_id(device, n) for n in range(ORDERS)]
    topic = orders_topic(device)
    follower = Follower(db, State())
    hits: Counter[str] = Counter()
    started = time.monotonic()

    def publish(numbers: Sequence[int]) -> None:
        for n in numbers:
            sender.publish(topic, order_payload(order(ids[n], qty(n), product=PRODUCT_IDS[n % 2])))

    with (
        Peer(port, "monitor", [status_topic(device), state_topic(device)]) as monitor,
        Peer(port, "sender") as sender,
    ):
        for number, run in enumerate(runs):
            agent = agents(config, f"run-{number:03d}")
            if number == 0:  # its persistent session exists from now on: the broker keeps its orders
                monitor.wait_online(device)
            publish(run.queued)
            eventually(started_after(db, follower.state.last_seq), "the run started", 30, agent)
            up = time.monotonic()
            if run.burst:
                time.sleep(max(0.0, up + run.burst_at - time.monotonic()))  # a random moment, drawn in plan()
                publish(run.burst)
            time.sleep(max(0.0, up + run.kill_at - time.monotonic()))  # likewise
            agent.kill()
            state = follower.after_kill()
            hits.update(phases(state, agent))
        killed = time.monotonic()

        publish(leftover)
        final = agents(config, "final")
        eventually(all_tidied(db, ids), "every order tidied up after the last kill", 120, final)
        rebirth(monitor, device)
        final.stop()
        views = monitor.payloads(state_topic(device))
    done = time.monotonic()
    print(
        f"{KILLS} kills in {killed - started:.0f} s, then {done - killed:.0f} s to finish {ORDERS} orders; "
        f"kills landed in: {dict(hits)}; {len(views)} published states checked"
    )

    rows = read_log(db)
    check_every_order_once(rows, ids)
    assert subjects(rows, "AgentStarted")["agent"] == KILLS + 1
    records = [row.decode() for row in rows]
    everything = fold(State(), records)
    with EventLog(db, readonly=True) as log_:
        assert canonical(replay(log_)) == canonical(everything), "replay from the snapshot differs from the fold"
    assert len(views) > KILLS // 2, f"only {len(views)} states published by {KILLS + 1} runs"
    check_reported(views, device, records)
    status = cli("status", "--json", "--db", str(db))
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown.pop("agent")["running"] is False
    assert set(shown.pop("outbox")) == {"published_seq", "waiting"}
    assert shown == state_view(everything), "status --json differs from the fold"
    verified = cli("log", "verify", "--db", str(db))
    assert verified.returncode == 0, f"log verify: {verified.stdout}{verified.stderr}"
    thin = {phase: hits[phase] for phase in PHASES if hits[phase] < MIN_HITS}
    assert not thin, f"too few kills landed in these phases: {thin} (all: {dict(hits)})"
