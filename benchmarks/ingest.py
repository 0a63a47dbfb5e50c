"""Order ingestion through a real broker, beside what the broker path itself carries.

    python -m benchmarks.ingest [--orders N]

`ingest.orders_per_s`: N distinct valid orders, sent at QoS 1 by `mosquitto_pub -l`
through a local Mosquitto to the whole agent in a child process (`python -m
edge_agent run`: MQTT 5 with its Receive Maximum, synchronous=FULL group commits,
the PUBACK of each order only after its OrderAccepted event is committed), from the
publisher's start until the Nth OrderAccepted is committed in the log. This is
acceptance, not the workflow: the plant runs at its normal slow pace, and
`limits.max_open_items` is above N so that no order is rejected as queue full.

`ingest.raw_qos1_msgs_per_s` (the raw limit): the same N payloads from the same
publisher through the same broker to `mosquitto_sub -q 1` (MQTT 5, the same Receive
Maximum), until it has received the Nth; the best of a few runs.

`ingest.client_only_msgs_per_s` (what limits the figure): the same N payloads into the
agent's MQTT client library alone, acknowledged on receipt and otherwise ignored; the
best of a few runs. The agent cannot accept orders faster than its client reads them.
"""

from __future__ import annotations

import select
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import (
    PREFIX,
    RECEIVE_WINDOW,
    BenchError,
    LogWatch,
    agent_config,
    agent_process,
    mosquitto,
    order_lines,
    publish_lines,
    run_alone,
    tool,
)
from edge_agent.mqtt.link import ReadAheadClient

ORDERS = 10_000
RAW_RUNS = 3  # the raw run is short, so its best of three is taken as the limit
TIMEOUT_S = 300.0
WARM_UP = "warm-up"
WARM_UP_LINE = b"warm-up\n"


def raw_rate(port: int, lines: list[bytes]) -> float:
    """Messages per second from `mosquitto_pub -l` to `mosquitto_sub` at QoS 1."""
    topic = f"{PREFIX}/raw"
    subscriber = subprocess.Popen(
        [
            *(tool("mosquitto_sub"), "-p", str(port), "-V", "5", "-q", "1", "-t", topic),
            *("-D", "connect", "receive-maximum", str(RECEIVE_WINDOW)),  # the agent's window
        ],
        stdout=subprocess.PIPE,
    )
    assert subscriber.stdout is not None
    out = subscriber.stdout
    try:
        # Until the subscription is in place: a warm-up message that comes back through it
        # (one sent before the broker has the subscription is simply lost, so send again).
        deadline = time.monotonic() + 30
        while not select.select([out], [], [], 0.2)[0]:
            if time.monotonic() > deadline:
                raise BenchError("mosquitto_sub did not subscribe")
            subprocess.run([tool("mosquitto_pub"), "-p", str(port), "-q", "1", "-t", topic, "-m", WARM_UP], check=True)

        def all_received() -> None:
            received = 0
            while received < len(lines):
                line = out.readline()
                if not line:
                    raise BenchError(f"mosquitto_sub stopped after {received} of {len(lines)} messages")
                received += line != WARM_UP_LINE  # late warm-ups may still come through

        return delivery_rate(port, topic, lines, all_received)
    finally:
        subscriber.kill()
        subscriber.wait()


def delivery_rate(port: int, topic: str, lines: list[bytes], all_received: Callable[[], None]) -> float:
    """Messages per second from starting `mosquitto_pub -l` on `topic` with `lines` until
    `all_received` returns."""
    started = time.perf_counter()
    publisher = publish_lines(port, topic, lines)
    all_received()
    elapsed = time.perf_counter() - started
    publisher.wait(TIMEOUT_S)
    return len(lines) / elapsed


def client_rate(port: int, lines: list[bytes]) -> float:
    """Messages per second into the agent's own MQTT client (paho-mqtt, MQTT 5, the same
    Receive Maximum and read-ahead socket) that acknowledges each one on receipt and does
    nothing else: the most the agent could accept through its client library."""
    topic = f"{PREFIX}/client"
    received, done, subscribed = 0, threading.Event(), threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal received
        client.ack(message.mid, message.qos)
        received += 1
        if received == len(lines):
            done.set()

    client = ReadAheadClient(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.ReceiveMaximum = RECEIVE_WINDOW
    client.connect("127.0.0.1", port, properties=properties)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        if not subscribed.wait(30):
            raise BenchError("the paho client did not subscribe")

        def all_received() -> None:
            if not done.wait(TIMEOUT_S):
                raise BenchError(f"the paho client received {received} of {len(lines)} messages")

        return delivery_rate(port, topic, lines, all_received)
    finally:
        client.loop_stop()
        client.disconnect()


def agent_rate(folder: Path, port: int, lines: list[bytes]) -> float:
    """Orders per second accepted durably by the agent process."""
    device = "bench-ingest"
    config = agent_config(
        folder / "agent",
        port,
        device,
        limits={"max_open_items": len(lines) + 1000},  # acceptance is measured, not the plant's room
    )
    watch = LogWatch(folder / "agent" / "data" / "events.db")
    with agent_process(config, device, port) as agent:

        def alive() -> None:
            if agent.poll() is not None:
                raise BenchError(f"the agent exited with {agent.returncode} during the run")

        watch.poll()  # start-up events are not orders
        started = time.perf_counter()
        publisher = publish_lines(port, f"{PREFIX}/orders", lines)
        done = watch.wait("OrderAccepted", len(lines), TIMEOUT_S, alive)
        publisher.wait(TIMEOUT_S)
        rejected = watch.poll().get("OrderRejected", 0)
    watch.close()
    if rejected:
        raise BenchError(f"the agent rejected {rejected} of the benchmark's orders")
    return len(lines) / (done - started)


def bench_ingest(folder: Path, orders: int = ORDERS) -> dict[str, float]:
    with mosquitto(folder / "broker") as broker:
        raw = max(raw_rate(broker.port, order_lines(orders, f"raw{run}")) for run in range(RAW_RUNS))
        client = max(client_rate(broker.port, order_lines(orders, f"client{run}")) for run in range(RAW_RUNS))
        ours = agent_rate(folder, broker.port, order_lines(orders, "order"))
    return {
        "orders_per_s": ours,
        "raw_qos1_msgs_per_s": raw,
        "ratio": ours / raw,
        "client_only_msgs_per_s": client,
        "client_only_ratio": client / raw,
    }


if __name__ == "__main__":
    run_alone(__doc__, "ingest", bench_ingest, "orders", ORDERS, "orders sent")
