"""Write the golden logs of the release on the import path into a folder.

    python scripts/golden_logs.py tests/golden/0.2.0
    PYTHONPATH=/tmp/old-release python scripts/golden_logs.py tests/golden/0.1.0   # an older release's

Two logs, each as the simulated cell left it when its process died (no
AgentStopped: the file is copied while the agent runs):

- `inflight.db`: orders at every stage: waiting for a station, building, built
  and waiting for the lane, on the lane, and finished ones;
- `compacted.db`: the same, then compacted with `retention: drop`, so the state
  of everything before its base lives only in a snapshot.

Only the API every release shares is used (`Config`, `Agent(config)`,
`agent.submit`, `agent.wait_until`, `EventLog`, `compact`), so any release from
0.1.0 on can run this script. Every later release keeps these logs and must take them over
(tests/test_golden_logs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import tempfile
from pathlib import Path

import edge_agent
from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.domain import commands as cmd
from edge_agent.domain.state import Stage, State
from edge_agent.log.compact import Retention, compact
from edge_agent.log.store import OUTBOX_CURSOR, EventLog

SPEED = 10.0  # the simulated machine 10x faster: one unit in 0.1 s, a transit in 0.3 s
# Three quick orders (built at once, then queued for the one lane), two long ones that
# keep two stations busy, and more than the third station can build meanwhile.
ORDERS = [("A", 3, 1), ("B", 2, 40), ("C", 6, 3)]  # (prefix, how many, qty)


def _order(order_id: str, qty: int) -> cmd.SubmitOrder:
    digest = cmd.order_digest(order_id, "widget-a", qty, "WH1", 0)
    return cmd.SubmitOrder(order_id, "widget-a", qty, "WH1", 0, digest)


def _every_stage(state: State) -> bool:
    """Some order waiting, one building, one built and waiting for the lane, one on it,
    and one finished."""
    items = list(state.work_items.values())
    waiting = any(i.stage is Stage.FACTORY_READY and i.station is None for i in items)
    building = any(i.stage is Stage.FACTORY_ACCEPTED for i in items)
    built = any(i.stage is Stage.FACTORY_COMPLETE for i in items)
    shipping = any(i.stage is Stage.MOVE_TO_WAREHOUSE for i in items)
    return waiting and building and built and shipping and state.inventory_seq >= 1


def _config(data_dir: Path, snapshot_every: int) -> Config:
    profile = Path(edge_agent.__file__).resolve().parents[1] / "device_profiles" / "simulated.yaml"
    return Config.model_validate(
        {
            "device_id": "golden-cell",
            "data_dir": data_dir,
            "profile": profile,
            "speed": SPEED,
            "http": {"enabled": False},
            "mqtt": {"host": "127.0.0.1", "port": 1},  # never connected: the agent alone has no MQTT
            "limits": {"min_free_mb": 0},
            "log": {"snapshot_every": snapshot_every},
        }
    )


async def _run_until_every_stage(config: Config, copy_to: Path) -> None:
    """Run the cell and copy its log whole at the first commit with every stage present."""
    async with Agent(config) as agent:
        runner = asyncio.create_task(agent.run())
        for prefix, count, qty in ORDERS:
            for number in range(1, count + 1):
                await agent.submit(_order(f"{prefix}{number}", qty))
        await asyncio.wait_for(agent.wait_until(_every_stage), timeout=60)
        # The copy is taken between two commits, as a power cut would leave the file.
        with sqlite3.connect(config.events_db) as source, sqlite3.connect(copy_to) as target:
            source.backup(target)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("inflight.db", "compacted.db"):
        (folder / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        asyncio.run(_run_until_every_stage(_config(work / "a", snapshot_every=20), folder / "inflight.db"))
        compacted = folder / "compacted.db"
        asyncio.run(_run_until_every_stage(_config(work / "b", snapshot_every=10), compacted))
        with EventLog(compacted) as log_:
            # Compaction never passes the outbox's cursor: as if the broker had acknowledged every event.
            log_.save_cursor(OUTBOX_CURSOR, log_.head().seq)
            done = compact(log_, Retention.drop, work / "archive")
        if not done.removed:
            raise SystemExit(f"{compacted}: nothing was compacted")
    print(f"edge-agent {edge_agent.__version__}: golden logs in {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/golden_logs.py FOLDER")
    write(Path(sys.argv[1]))
