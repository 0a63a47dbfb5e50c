"""Agent configs as the tests and the benchmarks build them: for an agent in-process
(`agent_config`) or in a child process (`config_file`), from the same values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edge_agent.config import Config
from tests.support import PROFILE
from tests.support.ports import free_port


def config_values(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The simulated cell with its log in `data_dir`, no HTTP endpoint, no broker listening
    (a free port: MQTT stays down) and no free-space floor (a test machine's disk is not the
    Pi's). A dict in `overrides` adds to the section it names; anything else replaces."""
    values: dict[str, Any] = {
        "device_id": "test-cell",
        "data_dir": data_dir,
        "profile": PROFILE,
        "http": {"enabled": False},
        "mqtt": {"host": "127.0.0.1", "port": free_port()},
        "limits": {"min_free_mb": 0},
    }
    for key, value in overrides.items():
        section = values.get(key)
        values[key] = {**section, **value} if isinstance(section, dict) and isinstance(value, dict) else value
    return values


def agent_config(data_dir: Path, **overrides: Any) -> Config:
    """The config of an agent run in-process (see `config_values`)."""
    return Config.model_validate(config_values(data_dir, **overrides))


def config_file(folder: Path, **overrides: Any) -> Path:
    """`folder`/config.yaml for an agent run in a child process, its log in `folder`/data
    unless `data_dir` says otherwise (see `config_values`)."""
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = overrides.pop("data_dir", folder / "data")
    values = json.loads(json.dumps(config_values(data_dir, **overrides), default=str))  # paths as text
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path
