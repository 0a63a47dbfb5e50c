"""Real MQTT brokers for tests: Mosquitto processes and the embedded amqtt broker,
each on a free port of 127.0.0.1."""

from __future__ import annotations

import getpass
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, wait_for_port
from tests.support.tools import tool


@dataclass
class Mosquitto:
    """A Mosquitto broker process that can be killed and started again on the same port
    (its persistence file keeps sessions and queued messages across the restart)."""

    folder: Path
    port: int
    extra: str = ""
    process: subprocess.Popen[bytes] | None = None
    defaults: bool = False  # nothing but a listener and anonymous access: no persistence, default limits

    @property
    def config_file(self) -> Path:
        return self.folder / "mosquitto.conf"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f"user {getpass.getuser()}\n"  # as root, mosquitto would drop to a user that cannot write here
            f"listener {self.port} 127.0.0.1\n"
            f"persistence true\npersistence_location {self.folder}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.folder}/mosquitto.log\n"
            f"{self.extra or 'allow_anonymous true'}\n",
            encoding="utf-8",
        )
        if self.defaults:
            self.config_file.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n", encoding="utf-8")
        self.process = subprocess.Popen([tool("mosquitto", "mosquitto"), "-c", str(self.config_file)])
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextmanager
def mosquitto(folder: Path, extra: str = "", *, defaults: bool = False) -> Iterator[Mosquitto]:
    broker = Mosquitto(folder, free_port(), extra, defaults=defaults)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
