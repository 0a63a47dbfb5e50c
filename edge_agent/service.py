"""Running the agent as a service: the embedded broker if configured, the agent,
its MQTT gateway, and an orderly stop on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from edge_agent.agent import Agent, demo_orders
from edge_agent.config import Config
from edge_agent.devices.profile import load_profile
from edge_agent.gateway import Gateway
from edge_agent.mqtt.broker import EmbeddedBroker

log = logging.getLogger(__name__)


def run_agent(config: Config, demo: int = 0) -> None:
    """Run in the foreground until SIGINT or SIGTERM."""
    asyncio.run(serve(config, demo))


async def serve(config: Config, demo: int = 0) -> None:
    profile = load_profile(config.profile)  # a bad profile stops us before any pin or the log is touched
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with AsyncExitStack() as stack:
        if config.mqtt.embedded:
            await stack.enter_async_context(EmbeddedBroker(config.mqtt.port, config.mqtt.host))
        agent = await stack.enter_async_context(Agent(config, profile=profile))
        gateway = Gateway(agent, config)
        async with asyncio.TaskGroup() as tasks:
            running = tasks.create_task(agent.run(), name="agent")
            online = tasks.create_task(gateway.run(), name="gateway")
            for order in demo_orders(demo, profile):
                await agent.submit(order)
            await stop.wait()
            log.info("stopping on signal")
            online.cancel()  # first say offline, then stop the cell
            await asyncio.wait([online])
            running.cancel()
