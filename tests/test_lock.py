"""One writer per data folder: a second agent, or `log compact` while the agent runs,
refuses with one line naming the holder; the kernel frees the lock on any death;
a taken port is named before the log is opened; `status` says whether the agent runs."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.lock import DataDirLocked
from edge_agent.log.store import EventLog
from tests.support.agents import wait_for_log
from tests.support.configs import config_file
from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("isolated")  # no ./config.yaml or EDGE_AGENT_* of the developer's


def write_config(folder: Path, **overrides: Any) -> Path:
    """By default no broker on its port: the agent runs offline."""
    return config_file(folder, **{"device_id": "lock-cell", "speed": 50, **overrides})


def edge_agent(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def run_agent(config: Path, children: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children.append(process)
    return process


def event_types(db: Path) -> list[str]:
    with EventLog(db, readonly=True) as log_:
        return [row.type for row in log_.rows()]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.slow
def test_a_second_agent_on_the_same_data_dir_exits_2_and_the_first_goes_on(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    config = write_config(tmp_path, http={"enabled": True, "port": free_port()})
    db = tmp_path / "data" / "events.db"
    first = run_agent(config, children, "--demo", "3")
    wait_for_log(db, "OrderAccepted", first)

    second = edge_agent("run", "--config", config)

    assert second.returncode == 2, second.stderr
    assert (
        one_error_line(second.stderr)
        == f"error: another edge-agent (pid {first.pid}) is running on {tmp_path / 'data'}"
    )
    types = event_types(db)
    assert types.count("AgentStarted") == 1
    assert "AgentStopped" not in types
    wait_for_log(db, "InventoryIssued", first)  # the first still builds
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0
    types = event_types(db)
    assert (types.count("AgentStarted"), types.count("AgentStopped"), types[-1]) == (1, 1, "AgentStopped")
    assert edge_agent("log", "verify", "--db", db).returncode == 0


@pytest.mark.slow
def test_after_kill_9_the_next_agent_starts(tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    config = write_config(tmp_path)
    db = tmp_path / "data" / "events.db"
    first = run_agent(config, children)
    wait_for_log(db, "AgentStarted", first)
    second = edge_agent("run", "--config", config)
    assert second.returncode == 2  # held while the first lives

    first.kill()  # SIGKILL: no clean-up of any kind; the kernel drops the lock
    first.wait()
    again = run_agent(config, children)
    wait_for_log(db, "AgentStarted", again, count=2)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=10) == 0, again.communicate()[1]


def test_two_agents_in_one_process_cannot_share_a_data_dir(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))

    async def scenario() -> tuple[int, str]:
        async with Agent(config) as agent:
            seq = agent.state.last_seq
            with pytest.raises(DataDirLocked) as refused:
                async with Agent(config):
                    pass
            assert agent.state.last_seq == seq
            return refused.value.exit_code, str(refused.value)

    exit_code, message = asyncio.run(scenario())
    assert exit_code == 2
    assert message == f"another edge-agent (pid {os.getpid()}) is running on {tmp_path / 'data'}"
    types = event_types(tmp_path / "data" / "events.db")
    assert types.count("AgentStarted") == 1
    assert types.count("AgentStopped") == 1


@pytest.mark.parametrize("link", ["symlink", "hard link"])
def test_an_agent_whose_log_is_a_link_to_another_data_dirs_log_refuses_to_start(tmp_path: Path, link: str) -> None:
    """Each data_dir's lock guards the log in it: a second agent given a link to a running
    agent's log would write it past that lock."""
    first = load_config(write_config(tmp_path / "first"))
    second = load_config(write_config(tmp_path / "second"))
    second.data_dir.mkdir(parents=True)

    async def scenario() -> None:
        async with Agent(first) as running_agent:
            seq = running_agent.state.last_seq
            if link == "symlink":
                second.events_db.symlink_to(first.events_db)
            else:
                os.link(first.events_db, second.events_db)
            with pytest.raises(ConfigError) as refused:
                async with Agent(second):
                    pass
            assert refused.value.exit_code == 2
            said = "is a symbolic link to" if link == "symlink" else "has other hard links"
            assert str(refused.value).startswith(f"{second.events_db} {said}")
            assert running_agent.state.last_seq == seq

    asyncio.run(scenario())
    assert event_types(first.events_db).count("AgentStarted") == 1


def test_a_status_probe_at_the_moment_the_agent_starts_does_not_stop_it(tmp_path: Path) -> None:
    """`status` takes a shared lock for an instant to see whether the agent runs; an agent
    starting in that instant waits for it rather than taking it for a second agent."""
    config = load_config(write_config(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lock").touch()

    async def scenario() -> int:
        async with Agent(config) as agent:
            return agent.state.last_seq

    with open(tmp_path / "data" / "lock") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH)  # what `status` holds while it looks
        release = threading.Timer(0.1, fcntl.flock, (probe, fcntl.LOCK_UN))
        release.start()
        try:
            assert asyncio.run(scenario()) > 0
        finally:
            release.cancel()
            release.join()


def test_the_lock_file_and_data_dir_are_private_whatever_the_umask(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))

    async def scenario() -> None:
        async with Agent(config):
            pass

    old = os.umask(0)
    try:
        asyncio.run(scenario())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "data" / "lock").stat().st_mode) == 0o640


def test_log_compact_refuses_while_the_agent_runs(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    db = tmp_path / "data" / "events.db"

    async def scenario() -> subprocess.CompletedProcess[str]:
        async with Agent(load_config(config_path)):
            before = db.read_bytes()
            compact = edge_agent("log", "compact", "--config", config_path, "--retention", "drop")
            assert db.read_bytes() == before
            return compact

    compact = asyncio.run(scenario())
    assert compact.returncode == 2
    assert one_error_line(compact.stderr) == (
        f"error: another edge-agent (pid {os.getpid()}) is running on {tmp_path / 'data'}, stop it first"
    )
    assert edge_agent("log", "compact", "--config", config_path, "--retention", "drop").returncode == 0


@pytest.mark.parametrize("key", ["http.port", "mqtt.port"])
def test_a_taken_port_is_one_line_naming_the_key_before_the_log_is_opened(tmp_path: Path, key: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if key == "http.port":
            config = write_config(tmp_path, http={"enabled": True, "port": port})
        else:
            config = write_config(tmp_path, mqtt={"embedded": True, "protocol": "3.1.1", "port": port})
        done = edge_agent("run", "--config", config)
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: {key}: 127.0.0.1:{port} is taken")
    assert not (tmp_path / "data" / "events.db").exists()


def test_status_says_whether_the_agent_runs(tmp_path: Path) -> None:
    """A stopped cell must never look as if it were building."""
    config_path = write_config(tmp_path)
    db = tmp_path / "data" / "events.db"

    async def scenario() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        async with Agent(load_config(config_path)):
            return edge_agent("status", "--config", config_path, "--json"), edge_agent(
                "status", "--config", config_path
            )

    as_json, as_text = asyncio.run(scenario())
    assert as_json.returncode == 0, as_json.stderr
    agent = json.loads(as_json.stdout)["agent"]
    assert (agent["running"], agent["pid"]) == (True, os.getpid())
    assert agent["since"]
    assert as_text.stdout.splitlines()[0].startswith(f"running, pid {os.getpid()}, up ")

    stopped = json.loads(edge_agent("status", "--config", config_path, "--json").stdout)
    assert stopped["agent"] == {"running": False, "pid": None, "since": None}
    with EventLog(db, readonly=True) as log_:
        last_ts = list(log_.rows())[-1].ts
    assert stopped["as_of"] == last_ts
    as_text = edge_agent("status", "--config", config_path)
    assert as_text.stdout.splitlines()[0] == f"not running; state as of {last_ts}"


def test_a_symlink_or_hard_link_to_the_running_agents_log_is_not_compacted(tmp_path: Path) -> None:
    """The lock is the real folder's: a link elsewhere does not make a second, free lock."""
    config_path = write_config(tmp_path)
    db = tmp_path / "data" / "events.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    symlink = elsewhere / "events.db"
    hard = tmp_path / "hard" / "events.db"
    hard.parent.mkdir()

    async def scenario() -> list[subprocess.CompletedProcess[str]]:
        async with Agent(load_config(config_path)):
            symlink.symlink_to(db)
            before = db.read_bytes()
            done = [
                edge_agent("log", "compact", "--db", symlink, "--retention", "drop"),
                edge_agent("status", "--db", symlink, "--json"),
            ]
            os.link(db, hard)
            done.insert(1, edge_agent("log", "compact", "--db", hard, "--retention", "drop"))
            done.append(edge_agent("status", "--db", hard))  # would read it without its -wal
            assert db.read_bytes() == before
            return done

    through_symlink, through_hard_link, status, status_through_hard_link = asyncio.run(scenario())
    assert through_symlink.returncode == 2
    assert one_error_line(through_symlink.stderr) == (
        f"error: another edge-agent (pid {os.getpid()}) is running on {tmp_path / 'data'}, stop it first"
    )
    assert not (elsewhere / "lock").exists()
    assert through_hard_link.returncode == 2
    assert "has other hard links" in one_error_line(through_hard_link.stderr)
    assert not (hard.parent / "lock").exists()
    assert status_through_hard_link.returncode == 2
    assert "has other hard links" in one_error_line(status_through_hard_link.stderr)
    assert sorted(p.name for p in hard.parent.iterdir()) == ["events.db"]  # no -wal or -shm made beside it
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["agent"]["running"] is True
