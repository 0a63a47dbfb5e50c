"""`edge-agent run`: the simulated plant in a real process, stopped in order by a signal."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.log.store import EventLog
from tests.support.agents import wait_for_log
from tests.support.configs import config_file


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_builds_demo_orders_and_stops_in_order_on_a_signal(tmp_path: Path, signum: signal.Signals) -> None:
    config = config_file(tmp_path, device_id="test-cell", speed=50)  # no broker on its port: it runs offline
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), "--demo", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "data" / "events.db"
    try:
        wait_for_log(db, "InventoryIssued", process)
        process.send_signal(signum)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped: outputs off, log closed" in out
    with EventLog(db, readonly=True) as log_:
        types = [row.type for row in log_.rows()]
    assert types[0] == "AgentStarted"
    assert types[-1] == "AgentStopped"
    assert types.count("OrderAccepted") == 3
