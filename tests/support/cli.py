"""The CLI as the tests run it: in-process (`cli`) or as the console script (`edge_agent`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner, Result

from edge_agent.cli.app import app
from tests.support.agents import subprocess_env

RUNNER = CliRunner()


def cli(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    """The app in-process (exceptions propagate, so a crash shows its traceback)."""
    return RUNNER.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def edge_agent(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS` as the console script runs it, in the test's own directory."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=env or subprocess_env(),
        timeout=60,
        check=False,
    )
