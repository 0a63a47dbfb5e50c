"""The whole agent in a child process, started on a config file, for the tests that need
it there: to kill it, to stop it with a signal, to run it beside a broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.support import ROOT, WAIT_S

RUN = ("-m", "edge_agent", "run", "--config")  # what systemd runs
MQTT_AGENT = ("-m", "tests.support.mqtt_agent")  # the same, reporting its messages and acks (see there)


class AgentProcess:
    """One run of `program` on `config`; its stdout and stderr (its log) go to the files
    NAME.out and NAME.err beside the config. No EDGE_AGENT_* variable of the developer's
    reaches it."""

    def __init__(self, config: Path, name: str = "agent", program: Sequence[str] = RUN, *args: str) -> None:
        self.config = config
        self.name = name
        self.out = config.parent / f"{name}.out"
        self.err = config.parent / f"{name}.err"
        self.argv = [sys.executable, *program, str(config), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=out, stderr=err)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None, f"agent {self.name} was never started"
        return self.proc

    def log_text(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace") if self.err.exists() else ""

    def reports(self, event: str) -> list[dict[str, Any]]:
        """Its complete stdout lines of that kind (MQTT_AGENT prints one JSON object a line)."""
        lines = self.out.read_text(encoding="utf-8").splitlines(keepends=True)
        found = [json.loads(line) for line in lines if line.endswith("\n")]
        return [r for r in found if r["event"] == event]

    def ids(self, event: str) -> list[str]:
        return [r["order_id"] for r in self.reports(event)]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            self.fail(f"agent {self.name} ended on its own (exit {self.process.returncode})")

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n--- its log ---\n{self.log_text()[-4000:]}")

    def wait_killed(self, timeout: float = WAIT_S) -> None:
        """Until it has killed itself (MQTT_AGENT's crash modes)."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"agent {self.name} did not kill itself within {timeout} s")
        if code != -signal.SIGKILL:
            self.fail(f"agent {self.name} exited with {code}, not by its own SIGKILL")

    def kill(self) -> None:
        """SIGKILL from outside, as a power cut would; it must have been running until then."""
        self.process.send_signal(signal.SIGKILL)  # nothing, if it has already ended: the exit code tells
        code = self.process.wait()
        if code != -signal.SIGKILL:
            self.fail(f"agent {self.name} ended on its own (exit {code}) before it was killed")

    def stop(self, signum: signal.Signals = signal.SIGTERM, *, expect: int | None = 0) -> int:
        """Signal it (SIGTERM: an orderly stop) and wait for it to exit; its exit code, which
        must be `expect` unless that is None."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.close()
            self.fail(f"agent {self.name} did not stop within {WAIT_S} s of {signum.name}")
        if expect is not None and code != expect:
            self.fail(f"agent {self.name} stopped with exit {code} on {signum.name}")
        return code

    def close(self) -> None:
        """Ends it if it still runs (the end of a test, passed or failed)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


Agents = Callable[..., AgentProcess]  # the `agents` fixture: start(config, name, *crash_args)
