"""config.yaml: the pydantic model, environment overrides, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in os.environ:
        if name.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_demo_config_is_valid_and_uses_the_embedded_broker() -> None:
    config = load_config(ROOT / "config.yaml")
    assert config.mqtt.embedded
    assert config.mqtt.protocol == "3.1.1"
    assert config.events_db == ROOT / "var" / "events.db"
    assert config.profile == ROOT / "device_profiles" / "simulated.yaml"


def test_every_key_of_the_contract_is_accepted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
device_id: cell-01
data_dir: /var/lib/edge-agent
profile: device_profiles/simulated.yaml
speed: 20
mqtt:
  embedded: false
  host: broker.local
  port: 8883
  topic_prefix: plant/a
  shared_group: cells
  username: agent
  password_file: /etc/edge-agent/password
  tls: {ca_file: ca.pem, cert_file: cert.pem, key_file: key.pem}
  protocol: "5"
  keepalive_s: 30
  session_expiry_s: 86400
log:
  synchronous: normal
  snapshot_every: 500
  retention: archive
telemetry_interval_s: 2
limits:
  max_payload_bytes: 4096
  max_open_items: 100
http:
  enabled: false
  bind: 0.0.0.0
  port: 9100
""",
        )
    )
    assert config.device_id == "cell-01"
    assert config.data_dir == Path("/var/lib/edge-agent")  # absolute paths stay as they are
    assert config.speed == 20.0
    assert config.mqtt.tls.ca_file == Path("ca.pem")
    assert config.log.retention == "archive"
    assert config.limits.max_payload_bytes == 4096


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data_dir: ./data\n"))
    assert config.events_db == tmp_path / "data" / "events.db"


def test_environment_variables_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "speed: 2\nmqtt:\n  port: 1999\n  host: file-host\n")
    monkeypatch.setenv("EDGE_AGENT_SPEED", "20")
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "1884")
    config = load_config(path)
    assert config.speed == 20.0
    assert config.mqtt.port == 1884
    assert config.mqtt.host == "file-host"  # the rest of the section is still the file's


def test_without_a_file_the_defaults_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("edge_agent.config.DEFAULT_PATHS", (tmp_path / "config.yaml",))
    config = load_config(None)
    assert config == Config()
    assert config.log.synchronous == "full"
    assert config.device_id  # the hostname


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("mqtt:\n  prot: 1883\n", "mqtt.prot"),
        ("mqtt:\n  port: abc\n", "mqtt.port"),
        ("mqtt:\n  port: 70000\n", "mqtt.port"),
        ("log:\n  synchronous: sometimes\n", "log.synchronous"),
        ("speed: -1\n", "speed"),
        ("device_id: 'has space'\n", "device_id"),
        ("colour: blue\n", "colour"),
    ],
)
def test_an_invalid_value_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert f": {key}: " in str(caught.value)


def test_an_invalid_environment_override_names_its_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "not-a-port")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "speed: 1\n"))
    assert caught.value.key == "mqtt.port"


@pytest.mark.parametrize("text", ["- a\n- b\n", "mqtt: [\n", "\x00"])
def test_a_file_that_is_not_a_yaml_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="config"):
        load_config(write(tmp_path, text))


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_the_agent_exits_2_on_a_bad_config_before_touching_the_log(tmp_path: Path) -> None:
    path = write(tmp_path, "data_dir: ./data\nlog:\n  snapshot_every: often\n")
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "log.snapshot_every" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
