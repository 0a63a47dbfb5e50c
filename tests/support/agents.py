"""Helpers for tests that run an agent in-process or watch a child process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.errors import ConfigError
from edge_agent.log.store import EventLog
from tests.support import WAIT_S


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


def wait_for_log(
    path: Path, condition_type: str, process: subprocess.Popen[str], timeout: float = WAIT_S, count: int = 1
) -> None:
    """Poll the log (another process writes it) until `count` events of that type are there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        with suppress(ConfigError), EventLog(path, readonly=True) as log_:  # ConfigError: not made yet
            if sum(1 for _ in log_.rows(type_=condition_type, limit=count)) >= count:
                return
        time.sleep(0.05)  # another process: SQLite offers nothing to wait on
    raise AssertionError(f"no {condition_type} in {path} after {timeout} s")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment minus what changes the CLI's behaviour (config, terminal detection)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EDGE_AGENT_") and k not in {"TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"}
    }
    env.update(extra)
    return env
