"""What the benchmarks share: a Mosquitto broker, the agent as a child process, a
folder on a real disk, readings from /proc, and percentiles.

Paths and ports come from tests/support, as the tests' do. The tests' broker helper
(tests/support/brokers.py) depends on pytest (it skips or fails a test when Mosquitto
is missing) and keeps a persistent broker, so the benchmarks start theirs here and
fail with a plain error instead.
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.mqtt.link import RECEIVE_MAXIMUM
from tests.support import ROOT
from tests.support.configs import config_file
from tests.support.orders import PRODUCT_IDS, order, order_payload
from tests.support.ports import free_port, wait_for_port
from tests.support.tools import find_tool

PREFIX = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
# The agent's MQTT 5 Receive Maximum: the raw subscriber gets the same window.
RECEIVE_WINDOW = RECEIVE_MAXIMUM


class BenchError(RuntimeError):
    """A benchmark could not be run (a missing tool, a child that died, a time-out)."""


def tool(name: str) -> str:
    """The path of a Mosquitto executable."""
    found = find_tool(name)
    if found is None:
        raise BenchError(f"{name} is not installed: apt-get install mosquitto mosquitto-clients")
    return found


@dataclass(frozen=True)
class Broker:
    port: int
    folder: Path


@contextmanager
def mosquitto(folder: Path) -> Iterator[Broker]:
    """A Mosquitto broker on a free port of 127.0.0.1, for the block.

    No persistence (the broker's disk writes would land in neither figure), and no cap
    on queued messages: Mosquitto's default of 1000 per client would drop orders that
    wait for a slow subscriber, and both subscribers measured must receive every one."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(
        f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot write here
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        "max_inflight_messages 0\n"  # the subscriber's Receive Maximum is the only window
        f"log_dest file {folder}/mosquitto.log\n",
        encoding="utf-8",
    )
    with open(folder / "mosquitto.out", "wb") as out:  # its warning about running as root, if any
        process = subprocess.Popen([tool("mosquitto"), "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield Broker(port, folder)
    finally:
        stop(process, 10)


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def disk_folder(prefix: str = "bench-") -> Iterator[Path]:
    """A fresh folder on a real disk for the block, removed after it. Durability and write
    counts mean nothing on tmpfs, so when the temporary folder is on tmpfs, the folder is
    made under the working directory instead."""
    base = Path(tempfile.gettempdir())
    if filesystem_type(base) in {"tmpfs", "ramfs"}:
        base = Path.cwd() / ".bench-tmp"
        base.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def filesystem_type(path: Path) -> str:
    """The type of the file system `path` is on (the longest mount point above it)."""
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
        fields = line.split()
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind


def agent_config(folder: Path, port: int, device_id: str, **settings: Any) -> Path:
    """A config file for the simulated cell talking to the broker on `port`, its log under `folder`."""
    mqtt = {"port": port, "protocol": "5", "topic_prefix": PREFIX}
    # At log level warning: one line per event would be disk writes and CPU of its own.
    return config_file(folder, device_id=device_id, **{"log_level": "warning", "mqtt": mqtt, **settings})


@contextmanager
def agent_process(config: Path, device_id: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The whole agent (`python -m edge_agent run`, what systemd runs) in a child process,
    once it has said `online` (so its subscriptions are in place); stopped with SIGTERM after."""
    log_file = config.parent / "agent.log"
    with open(log_file, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_online(port, device_id, process, log_file)
        yield process
    finally:
        stop(process, 15)


def wait_online(port: int, device_id: str, process: subprocess.Popen[bytes], log_file: Path) -> None:
    """Until the agent's retained status says `online`. The agent subscribes before it
    publishes that, on the same connection, so its order subscriptions are then active."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the agent exited with {process.returncode}:\n{log_file.read_text(errors='replace')}")
        status = subprocess.run(
            [tool("mosquitto_sub"), "-p", str(port), "-t", f"{PREFIX}/{device_id}/status", "-C", "1", "-W", "2"],
            capture_output=True,
            check=False,
        )
        if b'"online"' in status.stdout:
            return
    raise BenchError(f"the agent did not come online:\n{log_file.read_text(errors='replace')}")


def publish_lines(port: int, topic: str, lines: Sequence[bytes]) -> subprocess.Popen[bytes]:
    """`mosquitto_pub -l` at QoS 1 sending one message per line, started now."""
    publisher = subprocess.Popen(
        [tool("mosquitto_pub"), "-p", str(port), "-V", "5", "-q", "1", "-t", topic, "-l"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert publisher.stdin is not None
    publisher.stdin.write(b"\n".join(lines) + b"\n")
    publisher.stdin.close()
    return publisher


def order_lines(count: int, tag: str, qty: int = 1) -> list[bytes]:
    """`count` distinct valid orders, one JSON object a line (as mosquitto_pub -l sends them)."""
    return [
        order_payload(order(f"{tag}-{n:06d}", qty, product=PRODUCT_IDS[n % 2], priority=n % 3)) for n in range(count)
    ]


class LogWatch:
    """Counts committed events of given types in the agent's log, from another process
    (a read-only WAL reader never blocks the writer), reading only what is new each time."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self._conn: sqlite3.Connection | None = None
        self.last_seq = 0
        self.counts: dict[str, int] = {}

    def poll(self) -> dict[str, int]:
        if self._conn is None:
            if not self._db.exists():
                return self.counts
            self._conn = sqlite3.connect(f"{self._db.resolve().as_uri()}?mode=ro", uri=True)
        rows = self._conn.execute(
            "SELECT seq, type FROM events WHERE seq > ? ORDER BY seq", (self.last_seq,)
        ).fetchall()
        for seq, type_ in rows:
            self.counts[type_] = self.counts.get(type_, 0) + 1
            self.last_seq = seq
        return self.counts

    def wait(self, type_: str, count: int, timeout: float, alive: Callable[[], None], every: float = 0.01) -> float:
        """Until `count` events of `type_` are committed; the perf_counter at which that was seen."""
        deadline = time.monotonic() + timeout
        while self.poll().get(type_, 0) < count:
            alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {self.counts.get(type_, 0)} of {count} {type_} events after {timeout} s")
            time.sleep(every)  # another process writes: polling is all a reader can do
        return time.perf_counter()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (10^6 bytes), from /proc/<pid>/statm."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * PAGE_BYTES / 1e6


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/<pid>/io: rchar, wchar, read_bytes, write_bytes, cancelled_write_bytes..."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile (0..100) by nearest rank: a value that was actually measured."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def print_figures(section: str, figures: dict[str, float]) -> None:
    for name, value in figures.items():
        print(f"{section + '.' + name:<44}{value:>16,.3f}")


def run_alone(
    doc: str | None,
    section: str,
    bench: Callable[[Path, Any], dict[str, float]],
    option: str,
    default: float,
    what: str,
) -> None:
    """One benchmark run on its own from the command line: its one size option (of the
    default's type), a fresh folder on a real disk, its figures printed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{option}", type=type(default), default=default, help=what)
    args = parser.parse_args()
    with disk_folder() as folder:
        print_figures(section, bench(folder, getattr(args, option)))
