"""The agent with its MQTT gateway in a child process, for the MQTT fault and chaos tests.

Run as `python -m tests.support.mqtt_agent CONFIG [--crash-before-commit N | --crash-before-ack N]`
from the project root. It runs `edge_agent.service.serve(config)` in-process
until SIGINT / SIGTERM (an orderly stop, exit 0), logging to stderr at INFO.

On stdout, one JSON object per line (flushed), so that the test can tell what
reached the agent and what it acknowledged:
- `{"event": "received", "order_id", "topic", "mid", "dup"}` for every inbound
  message as paho hands it over (`order_id` is null when unreadable);
- `{"event": "acked", "order_id", "mid"}` just before an inbound message's
  PUBACK is handed to paho;
- `{"event": "crash", "before": "commit" | "ack", ...}` just before a SIGKILL.

The crash modes patch, in this process only:
- `--crash-before-commit N`: `Workflow.execute_batch` (the group commit of
  inbound orders) kills the process, before committing, as soon as N orders in
  all have reached it: the batch holding the Nth order is never committed and
  nothing of it is acknowledged;
- `--crash-before-ack N`: `Link.ack` kills the process on its Nth call, after the
  order's outcome is committed and before its PUBACK leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from edge_agent.config import load_config
from edge_agent.domain import commands as cmd
from edge_agent.domain.events import Recorded
from edge_agent.mqtt.link import Inbound, Link
from edge_agent.service import serve
from edge_agent.workflow.engine import Workflow

_print_lock = threading.Lock()  # paho's thread and the event loop both report


def say(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def order_id_of(payload: bytes) -> str | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    found = value.get("order_id") if isinstance(value, dict) else None
    return found if isinstance(found, str) else None


def die() -> None:
    """SIGKILL, as a power cut would: no handler, no flush of anything but stdout."""
    os.kill(os.getpid(), signal.SIGKILL)


def observe() -> None:
    """Report every inbound message and every acknowledgement on stdout."""
    received = Link._message
    acknowledge = Link.ack

    def message(self: Link, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)
        say("received", order_id=order_id_of(payload), topic=message.topic, mid=message.mid, dup=bool(message.dup))
        received(self, client, userdata, message)

    def ack(self: Link, message: Inbound) -> None:
        say("acked", order_id=order_id_of(message.payload), mid=message.mid)
        acknowledge(self, message)

    Link._message = message  # type: ignore[method-assign]
    Link.ack = ack  # type: ignore[method-assign]


def crash_before_commit(n: int) -> None:
    execute_batch = Workflow.execute_batch
    offered = 0

    def batch(self: Workflow, orders: Sequence[cmd.SubmitOrder | cmd.RejectOrder]) -> list[Recorded]:
        nonlocal offered
        offered += len(orders)
        if offered >= n:
            ids = [order.order_id for order in orders]
            say("crash", before="commit", offered=offered, batch=ids)
            die()
        return execute_batch(self, orders)

    Workflow.execute_batch = batch  # type: ignore[method-assign]


def crash_before_ack(n: int) -> None:
    acknowledge = Link.ack  # already the observing one: the crash comes before its `acked` line
    calls = 0

    def ack(self: Link, message: Inbound) -> None:
        nonlocal calls
        calls += 1
        if calls >= n:
            say("crash", before="ack", order_id=order_id_of(message.payload), mid=message.mid)
            die()
        acknowledge(self, message)

    Link.ack = ack  # type: ignore[method-assign]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.mqtt_agent")
    parser.add_argument("config", type=Path)
    crash = parser.add_mutually_exclusive_group()
    crash.add_argument("--crash-before-commit", type=int, metavar="N")
    crash.add_argument("--crash-before-ack", type=int, metavar="N")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    config = load_config(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    observe()
    if args.crash_before_commit is not None:
        crash_before_commit(args.crash_before_commit)
    if args.crash_before_ack is not None:
        crash_before_ack(args.crash_before_ack)
    asyncio.run(serve(config, 0, args.config))


if __name__ == "__main__":
    main(sys.argv[1:])
