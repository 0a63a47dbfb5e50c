"""The systemd service: the unit file checked by systemd-analyze, and the notify
protocol spoken over a real AF_UNIX datagram socket by a real agent process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.sdnotify import Notifier
from tests.support import ROOT
from tests.support.configs import config_file
from tests.support.tools import tool

UNIT = ROOT / "systemd" / "edge-agent.service"


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, with ExecStart pointing at an executable that exists here (verify checks it)."""
    text = UNIT.read_text(encoding="utf-8").replace(
        "/opt/edge-agent/venv/bin/edge-agent", sys.executable + " -m edge_agent"
    )
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text, encoding="utf-8")
    return copy


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_has_what_a_gpio_service_under_systemd_needs() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert "WatchdogSec" in unit
    assert "StartLimitBurst" in unit
    assert unit["User"] == ["edge-agent"]
    assert unit["SupplementaryGroups"] == ["gpio"]
    assert unit["DevicePolicy"] == ["closed"]
    assert any("gpiochip" in value for value in unit["DeviceAllow"])
    assert unit["StateDirectory"] == ["edge-agent"]
    assert unit["ConfigurationDirectory"] == ["edge-agent"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert "PrivateDevices" not in unit  # it would hide /dev/gpiochip*
    assert "PrivateUsers" not in unit  # it would break the gpio group


def test_systemd_analyze_verify_prints_no_warning(unit_copy: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze", "systemd"), "verify", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # A misspelt directive only warns, so the output must be empty, not just the exit code 0.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""


def test_systemd_analyze_security_scores_it_at_most_2(unit_copy: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze", "systemd"), "security", "--offline=yes", str(unit_copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for .*: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_a_misspelt_directive_is_caught(tmp_path: Path, unit_copy: Path) -> None:
    broken = tmp_path / "broken" / "edge-agent.service"
    broken.parent.mkdir()
    broken.write_text(unit_copy.read_text(encoding="utf-8").replace("NoNewPrivileges", "NoNewPrivilege"), "utf-8")
    result = subprocess.run(
        [tool("systemd-analyze", "systemd"), "verify", str(broken)], capture_output=True, text=True, check=False
    )
    assert "NoNewPrivilege" in result.stdout + result.stderr


# -- sd_notify -----------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


def test_the_notifier_speaks_the_protocol(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 1.5
    notifier.ready("running; log at seq 7")
    assert receive(sock) == {"READY": "1", "STATUS": "running; log at seq 7"}
    notifier.watchdog()
    assert receive(sock) == {"WATCHDOG": "1"}
    notifier.status("3 stations busy")
    assert receive(sock) == {"STATUS": "3 stations busy"}
    notifier.stopping("stopping")
    assert receive(sock) == {"STOPPING": "1", "STATUS": "stopping"}


def test_an_abstract_socket_and_no_socket_at_all() -> None:
    name = f"edge-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receive(sock) == {"WATCHDOG": "1"}
    quiet = Notifier({})
    assert not quiet.enabled
    quiet.ready("nobody listens")  # does nothing, raises nothing
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


@pytest.mark.slow
def test_the_agent_reports_ready_pings_the_watchdog_and_stops_within_5_s(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    config = config_file(tmp_path, device_id="notify-test")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # ping every 0.1 s
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        messages = [receive(sock)]
        assert messages[0].get("READY") == "1", messages
        assert "log at seq" in messages[0]["STATUS"]
        pings = 0
        while pings < 3:
            pings += receive(sock).get("WATCHDOG") == "1"
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while "STOPPING" not in (message := receive(sock)):
            assert message.get("WATCHDOG") == "1"
        assert process.wait(timeout=5) == 0, process.stderr.read() if process.stderr else ""
        assert time.monotonic() - stopped_at < 5
    finally:
        process.kill()


def test_a_stalled_event_loop_stops_the_watchdog_pings(notify_socket: tuple[socket.socket, str]) -> None:
    """The pings come from the event loop itself, so a loop that hangs stops them and
    systemd restarts the service."""
    import asyncio

    from edge_agent.service import _watchdog

    sock, path = notify_socket
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path})

    async def scenario() -> tuple[int, int]:
        pinging = asyncio.create_task(_watchdog(notifier, 0.01))
        await asyncio.sleep(0.1)
        before = drain(sock)
        time.sleep(0.3)  # the loop is stuck: a blocking call on it
        during = drain(sock)
        pinging.cancel()
        return before, during

    before, during = asyncio.run(scenario())
    assert before >= 3
    assert during <= 1  # at most the ping that was already due when the loop stalled


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return count
        count += 1
