"""The whole agent in a child process, for the agent crash test.

Run as `python -m tests.support.crash_agent DATA_DIR [--speed S] [--lockstep] [--out FILE]`
from the project root. It runs the Agent on the simulated profile with its log
in DATA_DIR and submits the same orders every time (same ids, same digests, so
a restarted process submitting them again is a no-op), then:

- prints `ready SEQ ON` once `Agent.__aenter__` has returned (the log is
  recovered, nothing resumed yet): SEQ is `state.last_seq` then, ON the outputs
  that are on at that moment, comma-separated, or `-` for none;
- prints `commit FIRST LAST EVENT...` (flushed) after every commit, one
  `Type:subject[:detail]` token per event, so a line on stdout means those
  events are in the log;
- with `--lockstep`, waits after each `commit` line for a line on stdin before
  the agent may go on; the test answers every line or kills the process, so
  the kill lands exactly after the commit it chose;
- once every order is tidied up, stops the agent in order, writes FILE (JSON:
  the seq it started at, the outputs at recovery, every output pin's history
  and every output switch with the log position it followed) and prints
  `done LAST_SEQ`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent
from edge_agent.domain import commands as cmd
from edge_agent.domain.state import State
from edge_agent.log.journal import Commit
from edge_agent.log.store import Row
from tests.support.configs import agent_config
from tests.support.orders import order

DEVICE_ID = "crash-cell"
SNAPSHOT_EVERY = 10  # the smallest the config allows: recovery goes through snapshots


# Nine orders for three stations, most of them more than one unit (so a build has a middle).
ORDERS: tuple[cmd.SubmitOrder, ...] = (
    order("order-01", 3, product="widget-a", priority=0),
    order("order-02", 2, product="gadget-b", priority=1),
    order("order-03", 2, product="widget-a", priority=0),
    order("order-04", 1, product="widget-a", priority=2),
    order("order-05", 3, product="gadget-b", priority=0),
    order("order-06", 2, product="widget-a", priority=1),
    order("order-07", 1, product="gadget-b", priority=0),
    order("order-08", 3, product="widget-a", priority=0),
    order("order-09", 2, product="gadget-b", priority=2),
)
ORDER_IDS = frozenset(o.order_id for o in ORDERS)


def token(row: Row) -> str:
    """One event of a `commit` line: its type, its subject and what tells it apart."""
    data: dict[str, Any] = json.loads(row.data)
    detail = data.get("inventory_id") or data.get("name") or data.get("station") or ""
    return f"{row.type}:{row.subject}:{detail}" if detail else f"{row.type}:{row.subject}"


def finished(state: State) -> bool:
    """Every order accepted and tidied up: nothing left to do."""
    return state.accepted >= len(ORDER_IDS) and not state.work_items  # only these ids are sent


class Reporter:
    """Prints each commit as it happens; in lockstep, holds the agent until told to go on."""

    def __init__(self, agent: Agent, lockstep: bool) -> None:
        self._agent = agent
        self._lockstep = lockstep
        self._seen = agent.state.last_seq
        # Every output switch, with the log position the agent had reached then.
        self.switches: list[tuple[str, bool, int]] = []

    def committed(self, commit: Commit) -> None:
        rows = list(self._agent.rows(self._seen + 1, commit.state.last_seq))
        self._seen = commit.state.last_seq
        print("commit", rows[0].seq, rows[-1].seq, *(token(row) for row in rows), flush=True)
        if self._lockstep and not sys.stdin.readline():
            self._lockstep = False  # the test has gone: run free

    def switched(self, name: str, on: bool) -> None:
        self.switches.append((name, on, self._agent.state.last_seq))


def pin_history(pin: Any) -> list[tuple[float, bool]]:
    return [(float(s.timestamp), bool(s.state)) for s in pin.states]


async def main(data_dir: Path, speed: float, lockstep: bool, out: Path | None) -> None:
    config = agent_config(data_dir, device_id=DEVICE_ID, speed=speed, log={"snapshot_every": SNAPSHOT_EVERY})
    async with Agent(config) as agent:
        # Recovered, and nothing resumed yet: what the outputs show now, before run().
        outputs = list(agent.devices.outputs)
        pins = {name: agent.devices.pin(name) for name in outputs}
        started_seq = agent.state.last_seq
        at_recovery = {name: pin_history(pin) for name, pin in pins.items()}
        on = [name for name in outputs if agent.devices.is_on(name)]
        print("ready", started_seq, ",".join(on) or "-", flush=True)

        reporter = Reporter(agent, lockstep)
        agent.add_observer(reporter.committed)
        agent.devices.watch(reporter.switched)
        running = asyncio.create_task(agent.run(), name="agent")
        for submitted in ORDERS:
            await agent.submit(submitted)
        await agent.wait_until(finished)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    # Stopped in order: the outputs were switched off and the log is closed.
    if out is not None:
        report = {
            "started_seq": started_seq,
            "at_recovery": at_recovery,
            "pins": {name: pin_history(pin) for name, pin in pins.items()},
            "switches": reporter.switches,
        }
        out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print("done", agent.state.last_seq, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.support.crash_agent")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--speed", type=float, default=20.0)
    parser.add_argument("--lockstep", action="store_true")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    asyncio.run(main(args.data_dir, args.speed, args.lockstep, args.out))
