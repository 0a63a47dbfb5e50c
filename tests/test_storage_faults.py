"""Disk and I/O faults: no order taken (so none acknowledged), outputs safe, the reason
told, and work resumed by itself once the log can be written again."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import orjson

from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.domain.events import Recorded
from edge_agent.domain.state import Stage
from edge_agent.storage import StorageGuard
from tests.support import WAIT_S
from tests.support.agents import running
from tests.support.configs import agent_config
from tests.support.orders import order


def make_config(data_dir: Path, **limits: int) -> Config:
    return agent_config(data_dir, device_id="fault-test", speed=50, limits=limits)


async def until(agent: Agent, condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)  # the fault path commits nothing: no commit to wait on


class Acks:
    """Stands in for the MQTT acknowledgements of offered orders."""

    def __init__(self) -> None:
        self.acked: list[str] = []

    def offer(self, agent: Agent, order_id: str) -> None:
        agent.offer(order(order_id, 3), lambda records: self._ack(order_id, records))

    def _ack(self, order_id: str, records: list[Recorded]) -> None:
        self.acked.append(order_id)


def outputs_on(agent: Agent) -> list[str]:
    return [name for name in agent.devices.outputs if agent.devices.is_on(name)]


def test_an_io_error_stops_orders_and_outputs_until_the_log_is_writable_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Agent(make_config(tmp_path)) as agent:
            acks = Acks()
            async with running(agent):
                acks.offer(agent, "before")
                await agent.wait_until(lambda s: "before" in s.work_items and s.work_items["before"].units_done > 0)
                assert "s1.run" in outputs_on(agent)

                agent.journal.log._db.execute("PRAGMA query_only = ON")  # every write fails from now
                acks.offer(agent, "during")
                await until(agent, lambda: agent.fault is not None)
                assert "readonly" in (agent.fault or "")
                assert outputs_on(agent) == []  # outputs safe
                await asyncio.sleep(0.3)  # units would keep coming if anything still ran
                assert acks.acked == ["before"]  # the order that could not be logged is not acknowledged
                assert outputs_on(agent) == []

                agent.journal.log._db.execute("PRAGMA query_only = OFF")  # the disk works again
                await until(agent, lambda: agent.fault is None)
                await until(agent, lambda: acks.acked == ["before", "during"])
                done = await agent.wait_until(lambda s: not s.work_items and s.accepted == 2)
                assert done.inventory_seq == 2  # both completed, nothing lost, nothing twice

    asyncio.run(scenario())


def test_free_space_below_the_floor_stops_orders_until_there_is_room(tmp_path: Path) -> None:
    room_mb = [0.0]  # the disk as full as it gets
    config = make_config(tmp_path, min_free_mb=100)
    storage = StorageGuard(tmp_path, config.limits.min_free_mb, free_mb=lambda folder: room_mb[0])

    async def scenario() -> None:
        async with Agent(config, storage=storage) as agent:
            acks = Acks()
            async with running(agent):
                acks.offer(agent, "waits")
                await until(agent, lambda: agent.fault is not None)
                assert "below the floor" in (agent.fault or "")
                assert acks.acked == []
                room_mb[0] = 150.0  # room again
                await until(agent, lambda: acks.acked == ["waits"])
                assert agent.fault is None
                await agent.wait_until(lambda s: s.inventory_seq == 1)

    asyncio.run(scenario())


def test_a_really_full_disk_is_survived_and_work_resumes_when_space_returns(small_disk: Path) -> None:
    async def scenario() -> None:
        async with Agent(make_config(small_disk)) as agent:
            acks = Acks()
            filler = small_disk / "filler"
            async with running(agent):
                with open(filler, "wb") as fill, suppress(OSError):
                    while True:  # until the file system is full
                        fill.write(b"\0" * 65536)
                        fill.flush()
                        os.fsync(fill.fileno())
                for n in range(20):
                    acks.offer(agent, f"o{n}")
                await until(agent, lambda: agent.fault is not None)
                assert outputs_on(agent) == []
                assert len(acks.acked) < 20
                filler.unlink()  # space returns
                await until(agent, lambda: len(acks.acked) == 20, timeout=20)
                state = await agent.wait_until(lambda s: s.inventory_seq == 20 and not s.work_items)
                assert state.accepted == 20
                assert all(item.stage is not Stage.FAILED for item in state.work_items.values())

    asyncio.run(scenario())


def test_the_status_topic_says_why_no_orders_are_taken(tmp_path: Path) -> None:
    from edge_agent.gateway import Gateway

    async def scenario() -> None:
        config = make_config(tmp_path)
        async with Agent(config) as agent:
            gateway = Gateway(agent, config)
            published: list[tuple[str, dict[str, object]]] = []

            def record(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
                published.append((topic, orjson.loads(payload)))
                return None

            gateway.link.publish = record  # type: ignore[method-assign]  # what would go to the broker
            async with running(agent):
                agent.journal.log._db.execute("PRAGMA query_only = ON")
                Acks().offer(agent, "x")
                await until(agent, lambda: agent.fault is not None)
                status = [payload for topic, payload in published if topic == gateway.topics.status]
                assert status[-1]["state"] == "online"
                assert "readonly" in str(status[-1]["fault"])
                agent.journal.log._db.execute("PRAGMA query_only = OFF")
                await until(agent, lambda: agent.fault is None)
                status = [payload for topic, payload in published if topic == gateway.topics.status]
                assert "fault" not in status[-1]

    asyncio.run(scenario())
