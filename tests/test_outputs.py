"""Outputs follow the log, fast: nothing comes on before the event that calls for it is on
disk, and a restart drives again what the recovered state calls for (the crash and chaos
suites prove the same under kills and faults, slowly; these keep `make test-fast` honest)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.domain.outputs import desired_outputs
from edge_agent.domain.state import Stage
from edge_agent.log.journal import replay
from edge_agent.log.store import EventLog
from tests.support import WAIT_S
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order


def make_config(tmp_path: Path, speed: float) -> Config:
    return agent_config(tmp_path / "data", device_id="cell-test", speed=speed)


def test_no_output_comes_on_before_the_event_calling_for_it_is_on_disk(tmp_path: Path) -> None:
    config = make_config(tmp_path, speed=50)
    switched_on: list[str] = []
    early: list[str] = []

    async def scenario() -> None:
        async with Agent(config) as agent:
            with EventLog(config.events_db, readonly=True) as disk:

                def watch(name: str, on: bool) -> None:
                    if not on:
                        return
                    switched_on.append(name)
                    # What another process reads from the file at this very moment.
                    if not desired_outputs(replay(disk, verify=False)).get(name, False):
                        early.append(name)

                agent.devices.watch(watch)
                async with running(agent):
                    for n in range(5):
                        await agent.submit(order(f"o{n}", 2))
                    async with asyncio.timeout(WAIT_S):
                        await agent.wait_until(lambda s: s.inventory_seq == 5 and not s.work_items)

    asyncio.run(scenario())
    assert early == []
    assert {"s1.run", "s2.run", "s3.run", "lane.conveyor"} <= set(switched_on)


def test_a_restart_drives_again_the_outputs_the_recovered_state_calls_for(tmp_path: Path) -> None:
    async def first_run() -> str:
        async with Agent(make_config(tmp_path, speed=50)) as agent, running(agent):
            await agent.submit(order("long", 100))
            state = await agent.wait_until(
                lambda s: s.work_items["long"].stage is Stage.FACTORY_ACCEPTED and s.work_items["long"].units_done > 0
            )
            station = state.work_items["long"].station
            assert station is not None
            return station

    async def second_run(station: str) -> None:
        # At speed 1 the next unit takes a second and a stalled build 10 s to be retried:
        # only the restart itself can switch the station on within the wait below.
        async with Agent(make_config(tmp_path, speed=1)) as agent:
            output = f"{station}.run"
            assert not agent.devices.is_on(output)  # start-up creates every output off
            recovered_seq = agent.state.last_seq
            came_on = asyncio.Event()
            seq_when_on: list[int] = []

            def watch(name: str, on: bool) -> None:
                if name == output and on:
                    seq_when_on.append(agent.state.last_seq)
                    came_on.set()

            agent.devices.watch(watch)
            async with running(agent):
                async with asyncio.timeout(WAIT_S / 2):
                    await came_on.wait()
            assert seq_when_on[0] == recovered_seq  # from the recovered state, before anything new

    asyncio.run(second_run(asyncio.run(first_run())))
