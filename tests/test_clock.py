"""Wall-clock jumps (no RTC, NTP late): timeouts run on the monotonic clock in-process,
and logged deadlines are re-armed sanely after a restart, whichever way the clock jumped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.domain.state import Stage, State
from tests.support import WAIT_S
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order

SPEED = 50.0
UNIT_TIMEOUT_S = 10 / SPEED  # simulated.yaml's unit_timeout_s at this speed
HOUR = timedelta(hours=1)


class JumpingClock:
    """The real clocks, but the wall clock can be jumped."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


def config(tmp_path: Path) -> Config:
    return agent_config(tmp_path, device_id="clock-test", speed=SPEED)


async def timed(agent: Agent, condition: Callable[[State], bool], timeout: float = WAIT_S) -> float:
    """Wait for a committed state that satisfies `condition`; the monotonic time it came."""
    async with asyncio.timeout(timeout):
        await agent.wait_until(condition)
    return time.monotonic()


def retried(order_id: str) -> Callable[[State], bool]:
    return lambda s: s.work_items[order_id].attempt >= 1


def building(order_id: str) -> Callable[[State], bool]:
    return lambda s: order_id in s.work_items and s.work_items[order_id].stage is Stage.FACTORY_ACCEPTED


@pytest.mark.parametrize("jump", [HOUR, -HOUR], ids=["forward", "backward"])
def test_a_wall_clock_jump_while_running_neither_fires_nor_holds_back_a_timeout(
    tmp_path: Path, jump: timedelta
) -> None:
    clock = JumpingClock()

    async def scenario() -> None:
        async with Agent(config(tmp_path), clock=clock) as agent:
            assert agent.simulator is not None
            agent.simulator.jammed.update({"s1", "s2"})  # no unit will ever come
            async with running(agent):
                await agent.submit(order("a", 3))
                armed = await timed(agent, building("a"))
                clock.offset = jump
                await agent.submit(order("b", 3))  # wakes the control loop after the jump
                fired = await timed(agent, retried("a"))
                assert fired - armed >= UNIT_TIMEOUT_S * 0.9  # not early after a forward jump
                assert fired - armed < UNIT_TIMEOUT_S + 2.0  # not an hour late after a backward one

    asyncio.run(scenario())


@pytest.mark.parametrize("jump", [HOUR, -HOUR], ids=["forward", "backward"])
def test_after_a_restart_across_a_wall_clock_jump_timeouts_start_afresh(tmp_path: Path, jump: timedelta) -> None:
    clock = JumpingClock()

    async def first_run() -> None:
        async with Agent(config(tmp_path), clock=clock) as agent:
            assert agent.simulator is not None
            agent.simulator.jammed.add("s1")
            async with running(agent):
                await agent.submit(order("a", 3))
                await timed(agent, building("a"))

    async def second_run() -> None:
        clock.offset = jump  # the device was off; its clock came back wrong
        async with Agent(config(tmp_path), clock=clock) as agent:
            assert agent.simulator is not None
            agent.simulator.jammed.add("s1")
            started = time.monotonic()
            async with running(agent):
                fired = await timed(agent, retried("a"))
                assert fired - started >= UNIT_TIMEOUT_S * 0.9
                assert fired - started < UNIT_TIMEOUT_S + 2.0

    asyncio.run(first_run())
    asyncio.run(second_run())
