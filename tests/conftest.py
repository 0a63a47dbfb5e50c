"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent_process import MQTT_AGENT, AgentProcess, Agents
from tests.support.brokers import Mosquitto, mosquitto

# The CLI's consoles take COLUMNS as their fixed width when they are made (at import): a
# width the test runner passes on (pytest-xdist's workers) would hold for every test, and
# the tests that set COLUMNS for one command would not get theirs.
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free port of 127.0.0.1, anonymous access allowed."""
    with mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts (append them); none outlives the test."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def agents() -> Iterator[Agents]:
    """Starts agents in child processes (`agents(config, name, *crash_args)`: the MQTT_AGENT
    program, its crash modes, its reports); none outlives the test."""
    started: list[AgentProcess] = []

    def start(config: Path, name: str, *crash: str) -> AgentProcess:
        agent = AgentProcess(config, name, MQTT_AGENT, *crash)
        started.append(agent)
        agent.start()
        return agent

    yield start
    for agent in started:
        agent.close()


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in `tmp_path` with no EDGE_AGENT_* variable: no ./config.yaml or setting of the
    developer's leaks into a test of the CLI."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB file system of its own, where the machine allows mounting one."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
