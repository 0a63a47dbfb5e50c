"""Helpers for tests that run an agent in-process or watch a child process."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

from edge_agent.agent import Agent


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    """The agent's control loop (and simulator) running for the block; stopped after it."""
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def next_line(proc: subprocess.Popen[str], who: str) -> str:
    """A child's next line of output; fails the test (with its stderr) if it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.endswith("\n"):
        proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        pytest.fail(f"the {who} stopped (exit {proc.returncode}):\n{stderr}")
    return line
