"""Signals and the service log: SIGHUP reloads what it can and names the rest; one line
per event, without a timestamp of our own under journald."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty, Queue

from edge_agent import __version__
from tests.support import WAIT_S
from tests.support.configs import config_file
from tests.support.ports import free_port


def write_config(folder: Path, level: str, telemetry_s: float, port: int, speed: float = 1.0) -> Path:
    """`folder`/config.yaml (written again by a test before it sends SIGHUP)."""
    settings = {"log_level": level, "telemetry_interval_s": telemetry_s, "speed": speed, "mqtt": {"port": port}}
    return config_file(folder, device_id="signal-test", **settings)


class Output:
    """The agent's stdout, line by line, to wait on."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: Queue[str] = Queue()
        self.seen: list[str] = []
        assert process.stdout is not None
        stream = process.stdout

        def read() -> None:
            for line in stream:
                self.lines.put(line)

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, text: str, timeout: float = WAIT_S) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except Empty:
                raise AssertionError(f"no line with {text!r}; saw:\n{''.join(self.seen)}") from None
            self.seen.append(line)
            if text in line:
                return line


def start(config: Path, *args: str, **env: str) -> tuple[subprocess.Popen[str], Output]:
    process = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    return process, Output(process)


def test_sighup_reloads_the_log_level_and_telemetry_interval_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, "info", 5, port)
    process, output = start(config)
    try:
        output.wait_for(f"edge-agent {__version__} on signal-test")
        write_config(tmp_path, "debug", 2, port, speed=3)
        process.send_signal(signal.SIGHUP)
        output.wait_for("DEBUG edge_agent.service: logging at debug")  # the new level is in force
        reloaded = output.wait_for("reloaded:")
        assert "log_level" in reloaded
        assert "telemetry_interval_s" in reloaded
        assert "speed" in output.wait_for("only after a restart")
        process.send_signal(signal.SIGHUP)  # the same file again: what was applied is not news
        assert "nothing changed that can be reloaded" in output.wait_for("reloaded:")
        assert "speed" in output.wait_for("only after a restart")  # still waiting for one
        write_config(tmp_path, "debug", 0, port)  # invalid: nothing changes, the agent goes on
        process.send_signal(signal.SIGHUP)
        assert "telemetry_interval_s" in output.wait_for("reload refused")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()


def test_one_line_per_event_with_no_timestamp_of_our_own_under_journald(tmp_path: Path) -> None:
    config = write_config(tmp_path, "info", 5, free_port())
    for journald in (False, True):
        process, output = start(config, **({"JOURNAL_STREAM": "8:12345"} if journald else {}))
        try:
            line = output.wait_for(f"edge-agent {__version__} on signal-test")
            assert line.startswith("INFO edge_agent.agent: ") == journald, line
            assert line.count("\n") == 1
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=5)


def test_log_level_on_the_command_line_overrides_the_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, "info", 5, free_port())
    process, output = start(config, "--log-level", "warning")
    try:
        first = output.wait_for("cannot reach the broker")  # a warning: shown
        assert "WARNING" in first
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=5)
    assert not any(" INFO " in line for line in output.seen)  # info: not shown


def test_sighup_names_every_changed_key_dotted_not_its_section(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, "info", 5, port)
    process, output = start(config)
    try:
        output.wait_for(f"edge-agent {__version__} on signal-test")
        text = config.read_text(encoding="utf-8").replace(f"port: {port}", f"port: {free_port()}")
        config.write_text(text + "log: {snapshot_every: 500}\n", encoding="utf-8")
        process.send_signal(signal.SIGHUP)
        pending = output.wait_for("only after a restart").rstrip("\n")
        assert pending.endswith("take effect only after a restart: log.snapshot_every, mqtt.port"), pending
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
