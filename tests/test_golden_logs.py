"""Every release takes over the logs every earlier release left behind (tests/golden/<release>/).

Each golden log is the simulated cell as its process died: orders waiting, building,
built, on the lane, finished (`inflight.db`), or the same compacted with `retention:
drop`, its state before the base only in a snapshot (`compacted.db`). This release
must replay any point of it, verify it, and start on it, finishing every order in
flight exactly once with the next inventory ids. See tests/golden/README.md.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.domain import events as ev
from edge_agent.domain.state import inventory_id
from edge_agent.log.store import EventLog
from tests.support import ROOT, WAIT_S
from tests.support.agents import running
from tests.support.cli import cli
from tests.support.configs import agent_config

GOLDEN = ROOT / "tests" / "golden"
LOGS = sorted(GOLDEN.glob("*/*.db"))


def test_this_release_and_the_last_have_their_golden_logs() -> None:
    for release in ("0.1.0", __version__):
        assert {p.name for p in (GOLDEN / release).glob("*.db")} == {"inflight.db", "compacted.db"}, release


def replayed(log: Path, seq: int) -> dict[str, object]:
    done = cli("log", "replay", "--db", log, "--to", str(seq), "--json")
    assert done.exit_code == 0, done.output
    view: dict[str, object] = json.loads(done.stdout)
    return view


@pytest.mark.parametrize("golden", LOGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_golden_log_is_replayed_verified_and_taken_over(golden: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    log = data / "events.db"
    shutil.copyfile(golden, log)
    with EventLog(log, readonly=True) as old:
        base, head = old.base().seq, old.head().seq

    # Every point of the old part replays, to the state as it was then.
    for seq in range(base, head + 1):
        assert replayed(log, seq)["last_seq"] == seq
    before = replayed(log, head)
    work_items = before["work_items"]
    assert isinstance(work_items, list)
    in_flight = {item["order_id"] for item in work_items}
    stages = {item["stage"] for item in work_items}
    assert {"FactoryReady", "FactoryAccepted", "FactoryComplete", "MoveToWarehouse"} <= stages
    issued_before = before["inventory_seq"]
    assert isinstance(issued_before, int)
    assert issued_before >= 1
    verified = cli("log", "verify", "--db", log)
    assert verified.exit_code == 0, verified.output

    async def take_over() -> None:
        async with Agent(agent_config(data, speed=20)) as agent, running(agent):
            await asyncio.wait_for(agent.wait_until(lambda state: not state.work_items), WAIT_S)

    asyncio.run(take_over())

    with EventLog(log, readonly=True) as new:
        later = [row.decode().event for row in new.rows(head + 1)]
    issued = [e for e in later if isinstance(e, ev.InventoryIssued)]
    assert sorted(e.order_id for e in issued) == sorted(in_flight)  # each once, none failed
    assert not [e for e in later if isinstance(e, ev.OrderFailed | ev.OrderCancelled)]
    expected_ids = [inventory_id(n) for n in range(issued_before + 1, issued_before + len(in_flight) + 1)]
    assert [e.inventory_id for e in issued] == expected_ids  # the next ids: none repeated, none skipped
    assert cli("log", "verify", "--db", log).exit_code == 0
    assert replayed(log, head) == before  # the old part still replays as it did
    # The log now says this release wrote to it too (what an older release reads to refuse it).
    check = cli("upgrade", "check", "--db", log, "--json")
    assert check.exit_code == 0, check.output
    assert __version__ in json.loads(check.stdout)["releases"]  # (0.1.0 said so only in AgentStarted events)
