"""The agent runtime: wires the layers together and runs until told to stop."""

from __future__ import annotations

import asyncio
import logging
import signal

from edge_agent import __version__
from edge_agent.clock import SystemClock
from edge_agent.config import Config
from edge_agent.log.journal import Journal

log = logging.getLogger(__name__)


def run_agent(config: Config) -> None:
    """Run in the foreground until SIGINT or SIGTERM."""
    asyncio.run(_serve(config))


async def _serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    with Journal.open(
        config.events_db,
        synchronous=config.log.synchronous,
        snapshot_every=config.log.snapshot_every,
        clock=SystemClock(),
    ) as journal:
        state = journal.state
        log.info(
            "edge-agent %s on %s: log %s at seq %d, %d live work items; Ctrl-C to stop",
            __version__,
            config.device_id,
            config.events_db,
            state.last_seq,
            len(state.work_items),
        )
        await stop.wait()
        log.info("stopping: log closed at seq %d", journal.state.last_seq)
