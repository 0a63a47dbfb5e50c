"""config.yaml: the pydantic model, environment overrides, and clear errors."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.config import Config, check_files, load_config
from edge_agent.errors import ConfigError
from edge_agent.mqtt.link import tls_context
from tests.support import PROFILE, ROOT
from tests.support.pki import make_pki


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
    assert config.mqtt.tls.ca_file == tmp_path / "ca.pem"  # relative: from the config file's folder
    assert config.log.retention == "archive"
    assert config.limits.max_payload_bytes == 4096


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "data_dir: ./data\n"))
    assert config.events_db == tmp_path / "data" / "events.db"


def test_every_relative_path_key_is_taken_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd the working directory is the state directory, not /etc/edge-agent."""
    elsewhere = tmp_path / "working-directory"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(
        write(
            tmp_path,
            "data_dir: data\nprofile: profiles/cell.yaml\n"
            "mqtt:\n  username: cell\n  password_file: secrets/mqtt-password\n"
            "  tls: {ca_file: pki/ca.pem, cert_file: pki/cell.pem, key_file: /abs/cell.key}\n",
        )
    )
    assert config.data_dir == tmp_path / "data"
    assert config.profile == tmp_path / "profiles" / "cell.yaml"
    assert config.mqtt.password_file == tmp_path / "secrets" / "mqtt-password"
    assert config.mqtt.tls.ca_file == tmp_path / "pki" / "ca.pem"
    assert config.mqtt.tls.cert_file == tmp_path / "pki" / "cell.pem"
    assert config.mqtt.tls.key_file == Path("/abs/cell.key")


def run_agent(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**clean, **env},
        cwd=config.parent.parent,  # not the config's folder
    )


def agent_config(tmp_path: Path, mqtt: str) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir()
    return write(
        folder,
        f"data_dir: ../data\nprofile: {PROFILE}\nhttp: {{enabled: false}}\nmqtt: {mqtt}\n",
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_missing_tls_file_is_a_config_error_naming_the_key_and_the_path(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1, tls: {ca_file: pki/ca.pem}}")
    done = run_agent(config)
    line = one_error_line(done)
    assert f"mqtt.tls.ca_file: cannot read {tmp_path / 'etc' / 'pki' / 'ca.pem'}" in line
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "events.db").exists()


def test_a_password_file_others_can_read_is_refused_with_the_chmod_to_run(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1, username: cell, password_file: mqtt-password}")
    secret = tmp_path / "etc" / "mqtt-password"
    secret.write_text("s3cret\n", encoding="utf-8")
    secret.chmod(0o640)
    line = one_error_line(run_agent(config))
    assert "mqtt.password_file" in line
    assert line.endswith(f"run: chmod 600 {secret}")
    assert not (tmp_path / "data" / "events.db").exists()

    secret.chmod(0o600)  # the advice works: the key is accepted
    assert load_config(config).mqtt.password_file == secret
    check_files(load_config(config))


def test_an_invalid_environment_value_names_the_variable(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1883}")
    line = one_error_line(run_agent(config, EDGE_AGENT_MQTT__PORT="abc"))
    assert line.startswith("error: EDGE_AGENT_MQTT__PORT: mqtt.port: ")
    assert "config.yaml" not in line  # the file is fine


@pytest.mark.parametrize("variable", ["EDGE_AGENT_SPEEED", "EDGE_AGENT_MQTT__PROT", "EDGE_AGENT_MQTT_PORT"])
def test_an_unknown_environment_variable_is_an_error_like_an_unknown_key(tmp_path: Path, variable: str) -> None:
    config = agent_config(tmp_path, "{port: 1883}")
    line = one_error_line(run_agent(config, **{variable: "20"}))
    assert line.startswith(f"error: {variable}: unknown key")
    assert not (tmp_path / "data").exists()


def test_variables_the_project_uses_that_are_not_keys_are_not_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_CRASH_SEED", "42")  # the crash test's seed
    assert load_config(write(tmp_path, "speed: 2\n")).speed == 2.0


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


def test_an_alias_bomb_is_refused_at_once_not_expanded(tmp_path: Path) -> None:
    """Nine levels of nine aliases each would be 387 million values: refused while counting."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 9)]
    path = write(tmp_path, "\n".join(levels) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="values once its aliases are expanded"):
        load_config(path)
    assert time.monotonic() - started < 5


def test_a_config_that_is_not_a_regular_file_is_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="the config is not a regular file"):
        load_config(fifo)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('profile: ""\n', "profile"),
        ("mqtt: {topic_prefix: $SYS}\n", "mqtt.topic_prefix"),
        ("mqtt: {topic_prefix: 'plant 1'}\n", "mqtt.topic_prefix"),
    ],
)
def test_a_profile_or_topic_prefix_that_names_nothing_usable_is_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key


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


# -- every file and folder the agent will use is checked before the log is touched ------------


def tls_config(tmp_path: Path, tls: str) -> Path:
    make_pki(tmp_path / "pki")
    (tmp_path / "pki" / "notes.txt").write_text("not a certificate\n", encoding="utf-8")
    return agent_config(tmp_path, f"{{port: 1, tls: {tls}}}")


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        ("{ca_file: ../pki/notes.txt}", "mqtt.tls.ca_file: {pki}/notes.txt holds no PEM certificate"),
        ("{ca_file: ../pki/server.key}", "mqtt.tls.ca_file: {pki}/server.key holds no PEM certificate"),
        (
            "{ca_file: ../pki/ca.crt, cert_file: ../pki/server.crt}",
            "mqtt.tls.cert_file: {pki}/server.crt holds no private key; set mqtt.tls.key_file",
        ),
        (
            "{ca_file: ../pki/ca.crt, cert_file: ../pki/server.key, key_file: ../pki/server.key}",
            "mqtt.tls.cert_file: {pki}/server.key holds no PEM certificate",
        ),
        (
            "{ca_file: ../pki/ca.crt, cert_file: ../pki/server.crt, key_file: ../pki/notes.txt}",
            "mqtt.tls.key_file: {pki}/notes.txt holds no PEM private key",
        ),
        (
            "{ca_file: ../pki/ca.crt, cert_file: ../pki/server.crt, key_file: ../pki/ca.key}",
            "mqtt.tls.key_file: {pki}/ca.key does not match the certificate in {pki}/server.crt",
        ),
        (
            "{ca_file: ../pki/ca.crt, key_file: ../pki/server.key}",
            "mqtt.tls.key_file: {pki}/server.key is set without mqtt.tls.cert_file",
        ),
    ],
)
def test_tls_files_the_link_cannot_use_are_config_errors_before_the_log(
    tmp_path: Path, tls: str, expected: str
) -> None:
    done = run_agent(tls_config(tmp_path, tls))
    line = one_error_line(done)
    assert line.startswith("error: " + expected.format(pki=tmp_path / "etc" / ".." / "pki")), line
    assert not (tmp_path / "data").exists()  # no lock, no log, no AgentStarted


def test_a_certificate_and_its_key_are_accepted(tmp_path: Path) -> None:
    config = load_config(
        tls_config(tmp_path, "{ca_file: ../pki/ca.crt, cert_file: ../pki/server.crt, key_file: ../pki/server.key}")
    )
    check_files(config)
    assert tls_context(config.mqtt) is not None


def unusable_data_dir(tmp_path: Path, case: str) -> Path:
    if case == "missing parent under /proc":
        return Path("/proc/edge-agent-nope/data")
    if case == "a file in the way":
        (tmp_path / "in-the-way").write_text("", encoding="utf-8")
        return tmp_path / "in-the-way"
    if os.geteuid() == 0:  # root may write anywhere but where the kernel says no
        return Path("/sys/edge-agent-nope/data")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "data"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing parent under /proc", "No such file or directory"),
        ("a file in the way", "it is a file, not a folder"),
        ("no permission", "Operation not permitted" if os.geteuid() == 0 else "Permission denied"),
    ],
)
def test_an_unusable_data_dir_is_one_line_naming_the_key_and_the_path(tmp_path: Path, case: str, reason: str) -> None:
    data_dir = unusable_data_dir(tmp_path, case)
    config = write(tmp_path, f"data_dir: {data_dir}\nprofile: {PROFILE}\n")
    done = run_agent(config)
    assert one_error_line(done) == f"error: data_dir: cannot use {data_dir}: {reason}"


def secret(tmp_path: Path, text: str, owner: int | None = None) -> Path:
    path = tmp_path / "etc" / "mqtt-password"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner, -1)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_password_file_of_another_user_is_refused_with_the_chown_to_run(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1, username: cell, password_file: mqtt-password}")
    path = secret(tmp_path, "s3cret\n", owner=pwd.getpwnam("nobody").pw_uid)
    line = one_error_line(run_agent(config))
    assert line.startswith(f"error: mqtt.password_file: {path} belongs to nobody, not to the agent's user root")
    assert line.endswith(f"run: chown root {path}")
    assert not (tmp_path / "data").exists()


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1, username: cell, password_file: mqtt-password}")
    path = secret(tmp_path, " \n")
    assert one_error_line(run_agent(config)) == f"error: mqtt.password_file: {path} is empty"
    assert not (tmp_path / "data").exists()


def test_a_password_file_without_a_username_is_refused(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "{port: 1, password_file: mqtt-password}")
    secret(tmp_path, "s3cret\n")
    line = one_error_line(run_agent(config))
    assert (
        line
        == f"error: {config}: mqtt.password_file: a password file needs mqtt.username (the user it is the password of)"
    )


def test_a_username_without_a_password_is_a_valid_setup(tmp_path: Path) -> None:
    """Mosquitto with `allow_anonymous true` and ACLs by user name takes a name alone."""
    config = load_config(agent_config(tmp_path, "{port: 1, username: cell}"))
    assert (config.mqtt.username, config.mqtt.password_file) == ("cell", None)
    check_files(config)


@pytest.mark.parametrize(
    ("variable", "key", "problem"),
    [
        ("EDGE_AGENT_MQTT__TLS__CA_FILE", "mqtt.tls.ca_file", "cannot read /nope: No such file or directory"),
        ("EDGE_AGENT_MQTT__PASSWORD_FILE", "mqtt.password_file", "cannot read /nope: No such file or directory"),
    ],
)
def test_a_bad_file_set_by_a_variable_names_the_variable(tmp_path: Path, variable: str, key: str, problem: str) -> None:
    config = agent_config(tmp_path, "{port: 1, username: cell}")
    line = one_error_line(run_agent(config, **{variable: "/nope"}))
    assert line == f"error: {variable}: {key}: {problem}"


def test_a_certificate_set_by_a_variable_that_is_not_one_names_the_variable(tmp_path: Path) -> None:
    config = tls_config(tmp_path, "{}")
    notes = tmp_path / "pki" / "notes.txt"
    line = one_error_line(run_agent(config, EDGE_AGENT_MQTT__TLS__CA_FILE=str(notes)))
    assert line.startswith(f"error: EDGE_AGENT_MQTT__TLS__CA_FILE: mqtt.tls.ca_file: {notes} holds no PEM certificate")


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("speed: 2\nlog_level: info\nspeed: 3\n", "speed", "1 and 3"),
        ("mqtt:\n  port: 1883\n  host: broker\n  port: 1884\n", "mqtt.port", "2 and 4"),
        ("mqtt:\n  tls: {ca_file: a.pem, ca_file: b.pem}\n", "mqtt.tls.ca_file", "2 and 2"),
        ("mqtt: {port: 1}\nlog: {retention: drop}\nmqtt: {host: b}\n", "mqtt", "1 and 3"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_it(tmp_path: Path, text: str, key: str, lines: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {key}: given twice (lines {lines})"
    assert caught.value.key == key


def test_a_folder_given_as_config_says_it_is_a_folder(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert one_error_line(done) == f"error: --config: {tmp_path} is a folder, not a file; name the config file in it"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_speed_from_a_variable_refuses_nan_and_inf(tmp_path: Path, value: str) -> None:
    config = agent_config(tmp_path, "{port: 1}")
    line = one_error_line(run_agent(config, EDGE_AGENT_SPEED=value))
    assert line == f"error: EDGE_AGENT_SPEED: speed: must be a finite number, not {value}"


@pytest.mark.parametrize(
    ("text", "key"), [("speed: .nan\n", "speed"), ("telemetry_interval_s: .inf\n", "telemetry_interval_s")]
)
def test_a_float_key_in_the_file_refuses_nan_and_inf(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert "must be a finite number" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [("device_id: x\nspeed: [\n", "line 3, column 1"), ("device_id: x\n  speed: 3\n", "line 2, column 8")],
)
def test_a_file_that_is_not_yaml_is_one_line_saying_where(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML: {where}: ")
