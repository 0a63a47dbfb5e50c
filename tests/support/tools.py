"""The programs some tests and benchmarks run (Mosquitto, its clients, openssl,
systemd-analyze): found the one way, Debian's /usr/sbin included."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def find_tool(name: str) -> str | None:
    """The path of a program, or None. Debian puts the Mosquitto broker in /usr/sbin, which
    is not on an ordinary user's PATH."""
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def tool(name: str, package: str) -> str:
    """The path of a program the test needs; without it the test fails under CI (.ci/run
    installs every package a test needs) and is skipped elsewhere."""
    found = find_tool(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs the {package} package)")
        pytest.skip(f"{name} is not installed: apt-get install {package}")
    return found
