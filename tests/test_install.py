"""scripts/install.sh lays out the service (a venv per install, config, profiles, unit) and
the agent runs from that layout, as a new user following the README would do it; an
upgrade is switched to only if the new version can take over the log, and
`--rollback` switches back to the venv in use before."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from edge_agent import __version__
from tests.support import ROOT
from tests.support.agents import subprocess_env, wait_for_log
from tests.support.plant import damage_newest_event, make_log
from tests.support.ports import free_port

pytestmark = pytest.mark.slow  # each install builds a venv


def install(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--root", str(target), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=subprocess_env(),
    )


def installed(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = install(target, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def in_use(target: Path) -> tuple[str, str | None]:
    """The venv the service runs (the link's target) and the one kept for a rollback."""
    opt = target / "opt/edge-agent"
    previous = opt / "venv.previous"
    return str((opt / "venv").readlink()), str(previous.readlink()) if previous.is_symlink() else None


def venvs(target: Path) -> list[str]:
    """Every venv kept, as the links name them."""
    return sorted(f"venvs/{path.name}" for path in (target / "opt/edge-agent/venvs").iterdir())


def version(target: Path) -> str:
    """What `edge-agent --version` of the venv in use says: it runs."""
    agent = target / "opt/edge-agent/venv/bin/edge-agent"
    return subprocess.run([agent, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def test_install_lays_out_the_service_and_the_agent_runs_from_it(tmp_path: Path) -> None:
    target = tmp_path / "root"
    first = installed(target)
    assert f"installed edge-agent {__version__}" in first.stdout
    venv, previous = in_use(target)
    assert venv.startswith(f"venvs/{__version__}-")
    assert previous is None  # a first install has nothing to go back to
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
    again = installed(target, "--no-check")
    assert "keeping the existing" in again.stdout  # a second install never overwrites the config


def test_an_upgrade_that_cannot_take_over_the_log_switches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "root"
    installed(target)
    before = in_use(target)
    data = target / "var/lib/edge-agent"
    # A log the installed agent wrote, damaged since: no release can take it over.
    damage_newest_event(make_log(data / "events.db", orders=2))

    upgrade = install(target)

    assert upgrade.returncode == 1, upgrade.stdout + upgrade.stderr
    assert f"upgrade check by edge-agent {__version__}" in upgrade.stdout  # asked before anything was switched
    line = upgrade.stderr.strip().splitlines()[-1]
    assert line.startswith(f"install.sh: edge-agent {__version__} ")
    assert "nothing was switched" in line
    assert in_use(target) == before
    assert venvs(target) == [before[0]]  # the new one is gone
    assert version(target) == f"edge-agent {__version__}"


def test_an_upgrade_whose_check_passes_switches_and_keeps_the_previous_venv(tmp_path: Path) -> None:
    target = tmp_path / "root"
    installed(target)
    before, _ = in_use(target)
    make_log(target / "var/lib/edge-agent/events.db", orders=2)  # what the installed agent wrote

    upgrade = installed(target)

    assert f"upgrade check by edge-agent {__version__}" in upgrade.stdout
    after, kept = in_use(target)
    assert after != before
    assert kept == before  # for a rollback
    assert version(target) == f"edge-agent {__version__}"


def test_rollback_switches_back_to_the_previous_venv_and_forth_again(tmp_path: Path) -> None:
    target = tmp_path / "root"
    nothing = install(target, "--rollback")
    assert nothing.returncode == 1
    assert (
        nothing.stderr.strip()
        == f"install.sh: nothing to roll back to: {target}/opt/edge-agent/venv.previous does not exist"
    )

    installed(target)
    first, _ = in_use(target)
    installed(target, "--no-check")
    second, kept = in_use(target)
    assert second != first
    assert kept == first

    back = installed(target, "--rollback")
    assert f"rolled back from edge-agent {__version__} to {__version__}" in back.stdout
    assert in_use(target) == (first, second)
    assert version(target) == f"edge-agent {__version__}"
    installed(target, "--rollback")  # and forth again
    assert in_use(target) == (second, first)

    installed(target, "--no-check")  # a third: only the one in use before it is kept
    third, kept = in_use(target)
    assert kept == second
    assert venvs(target) == sorted([second, third])


def test_a_venv_from_before_versioned_venvs_is_kept_for_a_rollback_and_still_runs(tmp_path: Path) -> None:
    target = tmp_path / "root"
    legacy = target / "opt/edge-agent/venv"
    subprocess.run(["python3", "-m", "venv", "--system-site-packages", legacy], check=True)
    subprocess.run([legacy / "bin/python", "-m", "pip", "install", "--quiet", ROOT], check=True, timeout=600)

    installed(target, "--no-check")
    _, kept = in_use(target)
    assert kept == f"venvs/{__version__}-installed-before"

    installed(target, "--rollback")
    assert in_use(target)[0] == f"venvs/{__version__}-installed-before"
    assert version(target) == f"edge-agent {__version__}"  # its scripts name .../venv/bin/python: the link
