"""What a running agent lets others read (`LogReader`): its rows, its state, a cursor of
one's own, and each commit as it happens, to as many observers as want it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.domain import events as ev
from edge_agent.log.journal import Commit
from edge_agent.log.reader import LogReader
from tests.support import WAIT_S
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order


def test_every_observer_hears_each_commit_until_it_leaves(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Agent(agent_config(tmp_path / "data", speed=50)) as agent:
            reader: LogReader = agent  # what the outbox and other consumers are given
            first: list[Commit] = []
            second: list[Commit] = []
            reader.add_observer(first.append)
            reader.add_observer(second.append)
            async with running(agent):
                await agent.submit(order("r1"))
                assert first == second
                heard = [record.event for commit in first for record in commit.records]
                assert ev.OrderAccepted in {type(event) for event in heard}
                assert first[-1].state == reader.state  # the state the commit led to
                assert all(commit.seconds >= 0 for commit in first)

                reader.remove_observer(second.append)
                heard_before = len(second)
                await agent.submit(order("r2"))
                assert len(second) == heard_before
                assert len(first) > heard_before

    asyncio.run(scenario())


def test_rows_by_subject_a_cursor_of_ones_own_and_the_next_commit(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Agent(agent_config(tmp_path / "data", speed=50)) as agent:
            reader: LogReader = agent
            async with running(agent):
                waiting = asyncio.ensure_future(reader.next_commit())
                await agent.submit(order("r1"))
                async with asyncio.timeout(WAIT_S):
                    state = await waiting
                assert state.accepted == 1  # the state of the commit that accepted it
                await agent.submit(order("r2"))
                await agent.wait_until(lambda s: not s.work_items)

            about = list(reader.rows(subject="r1"))
            assert {row.subject for row in about} == {"r1"}
            assert [row.type for row in about][-1] == ev.TidiedUp.__name__
            assert [row.seq for row in reader.rows(2, 4)] == [2, 3, 4]
            assert len(list(reader.rows(limit=3))) == 3

            assert reader.cursor("page") is None
            reader.save_cursor("page", 7)
            assert reader.cursor("page") == 7

    asyncio.run(scenario())
