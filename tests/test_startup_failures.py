"""A start-up that cannot proceed says why where someone will look: one line in the
journal, the reason retained on the `status` topic, an exit code of its own (3: the log
cannot be taken over, 4: the data folder cannot be written; 2 stays a config error), and
every output off; systemd then does not restart it in a loop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from edge_agent import __version__
from edge_agent.devices.gpio import Devices
from edge_agent.domain import events as ev
from edge_agent.errors import EXIT_LOG_REFUSED, EXIT_STORAGE_FAULT, EdgeAgentError
from edge_agent.hooks import Hooks
from edge_agent.lock import DataDirLock
from edge_agent.log.journal import Journal
from edge_agent.service import serve
from tests.support import ROOT
from tests.support.agents import subprocess_env, wait_for_log
from tests.support.brokers import Mosquitto
from tests.support.configs import agent_config, config_file
from tests.support.orders import order, order_payload
from tests.support.peer import on, peer, status_topic
from tests.support.plant import damage_newest_event, make_log

DEVICE_ID = "refused-cell"
UNIT = ROOT / "systemd" / "edge-agent.service"


def damage_an_event(data_dir: Path) -> None:
    """A log whose newest event (after its last snapshot) was damaged on disk."""
    damage_newest_event(make_log(data_dir / "events.db", orders=3, snapshot_every=1000))


def record_other_steps(data_dir: Path) -> None:
    """A log whose live item went through a step this workflow does not have."""
    with Journal.open(data_dir / "events.db") as journal:
        journal.append(
            [ev.OrderAccepted("old-1", "widget-a", 1, "WH1", 0, "d"), ev.StepCompleted("old-1", 0, "old_step_name")]
        )


def ran_before(data_dir: Path) -> None:
    """What an agent that ran here leaves: its log and its lock file."""
    make_log(data_dir / "events.db", orders=3)
    with DataDirLock(data_dir):
        pass


def remount_read_only(data_dir: Path) -> None:
    """What the kernel does to a file system after I/O errors (ext4's errors=remount-ro)."""
    ran_before(data_dir)
    subprocess.run(["mount", "-o", "remount,ro", str(data_dir)], check=True)


def fill_up(data_dir: Path) -> None:
    ran_before(data_dir)
    fd = os.open(data_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:  # ENOSPC: full
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Case:
    prepare: Callable[[Path], None]
    exit_code: int
    reason: str  # in the line, and in the retained status
    on_small_disk: bool = False  # a file system of its own (to fill, or to remount read-only)
    outputs_created: bool = True  # the start got as far as creating the outputs (then the log failed)


CASES = {
    "damaged log": Case(damage_an_event, EXIT_LOG_REFUSED, "hash does not match"),
    "other workflow": Case(record_other_steps, 2, "'old_step_name'"),  # a newer release's, to this one
    "read-only file system": Case(remount_read_only, EXIT_STORAGE_FAULT, "Read-only file system", True, False),
    "full disk": Case(fill_up, EXIT_STORAGE_FAULT, "cannot open the log", True),
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Case, Path]:
    """A data folder in which the agent cannot start, and what it must say."""
    chosen = CASES[request.param]
    tmp_path: Path = request.getfixturevalue("tmp_path")
    data_dir = request.getfixturevalue("small_disk") if chosen.on_small_disk else tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    chosen.prepare(data_dir)
    return chosen, data_dir


def run_agent(config: Path) -> subprocess.CompletedProcess[str]:
    """`edge-agent run` as systemd starts it, until it exits."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def retained_status(broker: Mosquitto) -> dict[str, Any]:
    """What a client subscribing now is told of the device."""
    topic = status_topic(DEVICE_ID)
    with peer(broker.port, "5", topic, name="late") as late:
        message = late.wait_for(on(topic))
    assert message.retain
    status: dict[str, Any] = message.json()
    return status


def test_a_start_that_cannot_proceed_says_why_in_one_line_on_the_status_topic_and_in_its_exit_code(
    case: tuple[Case, Path], tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    expected, data_dir = case
    config = config_file(tmp_path / "etc", device_id=DEVICE_ID, data_dir=data_dir, mqtt={"port": mosquitto_broker.port})

    started = run_agent(config)

    assert started.returncode == expected.exit_code, started.stdout + started.stderr
    lines = started.stderr.strip().splitlines()
    assert len(lines) == 1, started.stderr
    assert lines[0].startswith("error: ")
    reason = lines[0].removeprefix("error: ")
    assert expected.reason in reason
    assert str(data_dir) in reason  # which log, which folder
    assert expected.reason not in started.stdout  # said once
    status = retained_status(mosquitto_broker)
    assert status["state"] == "offline"
    assert status["error"] == reason
    assert status["version"] == __version__
    datetime.fromisoformat(status["since"])


def test_every_output_is_created_off_before_the_log_is_opened_and_none_comes_on(
    case: tuple[Case, Path], mosquitto_broker: Mosquitto
) -> None:
    expected, data_dir = case
    config = agent_config(data_dir, device_id=DEVICE_ID, mqtt={"port": mosquitto_broker.port})
    wal = config.events_db.with_name(config.events_db.name + "-wal")
    pins: dict[str, Any] = {}
    log_open_at_creation: list[bool] = []

    def created(devices: Devices) -> None:
        pins.update({name: devices.pin(name) for name in devices.outputs})
        log_open_at_creation.append(wal.exists())  # an open log in WAL mode has its -wal file

    with pytest.raises(EdgeAgentError) as refused:  # StartRefused, or NewerLog (exit 2)
        asyncio.run(serve(config, hooks=Hooks(devices=created)))

    assert refused.value.exit_code == expected.exit_code
    if expected.outputs_created:
        assert log_open_at_creation == [False]
        assert {"s1.run", "lane.conveyor"} <= set(pins)
    else:  # refused before the outputs were made: the pins were never driven at all
        assert pins == {}
    for name, pin in pins.items():
        assert [bool(s.state) for s in pin.states] == [False], name  # created off, never on


def test_an_order_sent_while_the_start_is_refused_is_taken_once_the_log_is_mended(
    tmp_path: Path, mosquitto_broker: Mosquitto, children: list[subprocess.Popen[str]]
) -> None:
    """The refused start tells the broker why as the device itself: what the broker holds for
    the device meanwhile is not acknowledged, so the next start still gets it."""
    config = config_file(tmp_path, device_id=DEVICE_ID, speed=50, mqtt={"port": mosquitto_broker.port})
    data_dir = tmp_path / "data"
    topic = status_topic(DEVICE_ID)
    command = [sys.executable, "-m", "edge_agent", "run", "--config", str(config)]
    with peer(mosquitto_broker.port, "5", topic) as watcher:  # once, so that the broker keeps its session
        first = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), text=True)
        children.append(first)
        watcher.wait_for(on(topic, state="online"))
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=10) == 0
    record_other_steps(data_dir)
    with peer(mosquitto_broker.port, "5", name="office") as office:
        office.publish("factory/orders", order_payload(order("while-refused")))

    assert run_agent(config).returncode == 2  # a step list this release does not have: a newer one's
    assert retained_status(mosquitto_broker)["state"] == "offline"

    (data_dir / "events.db").rename(data_dir / "events.db.refused")  # what the operator does next
    second = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), text=True, stdout=subprocess.PIPE)
    children.append(second)
    wait_for_log(data_dir / "events.db", "OrderAccepted", second)


def test_systemd_does_not_restart_what_a_restart_cannot_mend() -> None:
    unit: dict[str, str] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith("#"):
            unit[key.strip()] = value.strip()
    assert unit["Restart"] == "on-failure"
    assert str(EXIT_LOG_REFUSED) in unit["RestartPreventExitStatus"].split()
    assert str(EXIT_STORAGE_FAULT) not in unit["RestartPreventExitStatus"].split()  # a disk may recover
    assert int(unit["StartLimitBurst"]) <= 5
    assert int(unit["StartLimitIntervalSec"]) >= 60
