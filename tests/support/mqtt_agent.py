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

Reported and crashed through the agent's hooks (`edge_agent.hooks`):
- `--crash-before-commit N`: the process dies before the group commit of
  inbound orders as soon as N orders in all have reached it: the batch holding
  the Nth order is never committed and nothing of it is acknowledged;
- `--crash-before-ack N`: it dies at the Nth acknowledgement, after the
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_agent.config import load_config
from edge_agent.domain import commands as cmd
from edge_agent.hooks import Hooks
from edge_agent.mqtt.link import Inbound
from edge_agent.service import serve

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


def received(message: Inbound) -> None:
    say("received", order_id=order_id_of(message.payload), topic=message.topic, mid=message.mid, dup=message.dup)


def acking(crash_at: int | None) -> Callable[[Inbound], None]:
    """Report each acknowledgement; with `crash_at`, die before the PUBACK of that many."""
    calls = 0

    def ack(message: Inbound) -> None:
        nonlocal calls
        calls += 1
        if crash_at is not None and calls >= crash_at:
            say("crash", before="ack", order_id=order_id_of(message.payload), mid=message.mid)
            die()
        say("acked", order_id=order_id_of(message.payload), mid=message.mid)

    return ack


def deciding(crash_at: int | None) -> Callable[[Sequence[cmd.SubmitOrder | cmd.RejectOrder]], None]:
    """With `crash_at`, die before committing the group that holds that many orders in all."""
    offered = 0

    def decide(orders: Sequence[cmd.SubmitOrder | cmd.RejectOrder]) -> None:
        nonlocal offered
        offered += len(orders)
        if crash_at is not None and offered >= crash_at:
            say("crash", before="commit", offered=offered, batch=[order.order_id for order in orders])
            die()

    return decide


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
    hooks = Hooks(received, acking(args.crash_before_ack), deciding(args.crash_before_commit))
    asyncio.run(serve(config, 0, args.config, hooks))


if __name__ == "__main__":
    main(sys.argv[1:])
