"""scripts/install.sh lays out the service (venv, config, profiles, unit) and the agent
runs from that layout, as a new user following the README would do it."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from edge_agent import __version__
from tests.support import ROOT
from tests.support.agents import wait_for_log
from tests.support.ports import free_port


@pytest.mark.slow
def test_install_lays_out_the_service_and_the_agent_runs_from_it(tmp_path: Path) -> None:
    target = tmp_path / "root"
    installed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert f"installed edge-agent {__version__}" in installed.stdout
    agent = target / "opt/edge-agent/venv/bin/edge-agent"
    unit = (target / "etc/systemd/system/edge-agent.service").read_text(encoding="utf-8")
    assert "ExecStart=/opt/edge-agent/venv/bin/edge-agent run --config /etc/edge-agent/config.yaml" in unit
    assert agent.is_file()
    config = target / "etc/edge-agent/config.yaml"
    assert "data_dir: /var/lib/edge-agent" in config.read_text(encoding="utf-8")
    assert (target / "etc/edge-agent/device_profiles/rpi-2station.yaml").is_file()

    # Run it from the layout; the Pi profile needs GPIO, so the simulated one stands in.
    data = target / "var/lib/edge-agent"
    env = {
        **os.environ,
        "EDGE_AGENT_DATA_DIR": str(data),
        "EDGE_AGENT_PROFILE": str(target / "etc/edge-agent/device_profiles/simulated.yaml"),
        "EDGE_AGENT_SPEED": "50",
        "EDGE_AGENT_MQTT__PORT": str(free_port()),
        "EDGE_AGENT_HTTP__ENABLED": "false",
    }
    process = subprocess.Popen(
        [str(agent), "run", "--config", str(config), "--demo", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_log(data / "events.db", "InventoryIssued", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
    again = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0
    assert "keeping the existing" in again.stdout  # a second install never overwrites the config
