"""Idle cost of the whole agent, beside an idle bare Python process.

    python -m benchmarks.idle [--seconds S]

`idle.cpu_percent`: CPU (user + system, all threads, from /proc/<pid>/stat) of the
whole agent in a child process (`python -m edge_agent run`: connected to a local
Mosquitto over MQTT 5, the simulated cell on MockFactory pins with its simulator,
the HTTP health server on, telemetry every 5 s, log at info) over S seconds (60)
without orders, as a percentage of one core. `idle.rss_mb`: its resident memory at
the end of that window.

The raw limits, measured over the same window: `idle.raw_cpu_percent` and
`idle.raw_rss_mb` of a bare Python that imported paho-mqtt, pydantic and gpiozero
and sleeps (the floor any agent on these libraries starts from), and
`idle.raw_rss_mb_agent_imports` of one that imported every module the agent's
service imports, so that what the agent adds by running is told apart from what
its imports cost. The CPU of a sleeping process is about zero, so the CPU figure is
given beside it rather than as a ratio; `idle.rss_ratio` is rss_mb / raw_rss_mb.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from benchmarks.common import (
    BenchError,
    agent_config,
    agent_process,
    mosquitto,
    proc_cpu_s,
    proc_rss_mb,
    run_alone,
)
from tests.support.ports import free_port

SECONDS = 60.0
SETTLE_S = 3.0  # start-up (log recovery, first telemetry) is not idling yet
LIBRARIES = "import paho.mqtt.client, pydantic, gpiozero, gpiozero.pins.mock"
AGENT_IMPORTS = "import edge_agent.service, edge_agent.cli"


@contextmanager
def sleeper(imports: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Python process that ran `imports` and then only sleeps."""
    code = f"{imports}\nimport sys, time\nprint('ready', flush=True)\ntime.sleep(1e6)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        if process.stdout.readline() != b"ready\n":
            raise BenchError(f"python -c {imports!r} failed")
        yield process
    finally:
        process.kill()
        process.wait()


def bench_idle(folder: Path, seconds: float = SECONDS) -> dict[str, float]:
    with ExitStack() as stack:
        broker = stack.enter_context(mosquitto(folder / "broker"))
        device = "bench-idle"
        http_port = free_port()
        config = agent_config(
            folder / "agent", broker.port, device, log_level="info", http={"enabled": True, "port": http_port}
        )
        agent = stack.enter_context(agent_process(config, device, broker.port))
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as health:
            if health.status != 200:
                raise BenchError(f"the agent is not healthy: {health.read()!r}")
        raw = stack.enter_context(sleeper(LIBRARIES))
        raw_full = stack.enter_context(sleeper(AGENT_IMPORTS))
        time.sleep(SETTLE_S)
        pids = (agent.pid, raw.pid)
        cpu_before = [proc_cpu_s(pid) for pid in pids]
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        cpu = [(proc_cpu_s(pid) - before) / elapsed * 100 for pid, before in zip(pids, cpu_before, strict=True)]
        if agent.poll() is not None:
            raise BenchError(f"the agent exited with {agent.returncode} while idle")
        rss, raw_rss, raw_full_rss = proc_rss_mb(agent.pid), proc_rss_mb(raw.pid), proc_rss_mb(raw_full.pid)
    return {
        "cpu_percent": cpu[0],
        "raw_cpu_percent": cpu[1],
        "rss_mb": rss,
        "raw_rss_mb": raw_rss,
        "raw_rss_mb_agent_imports": raw_full_rss,
        "rss_ratio": rss / raw_rss,
    }


if __name__ == "__main__":
    run_alone(__doc__, "idle", bench_idle, "seconds", SECONDS, "length of the idle window")
