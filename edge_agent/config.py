"""The agent's configuration: a pydantic model of `config.yaml` (the README's "Configuration" lists every key).

The file is read once, then `EDGE_AGENT_<KEY>` / `EDGE_AGENT_<SECTION>__<KEY>`
environment variables override it. This is the only module that reads them; a
variable that names no key is an error, like an unknown key in the file, and an
invalid value is blamed on the variable that set it. Every path key (any field
typed `Path`) relative in the file is taken from the file's own folder, so the
agent finds its data and its credentials wherever it is started from (under
systemd, the working directory is the state directory).
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edge_agent.errors import ConfigError

DEFAULT_PATHS = (Path("config.yaml"), Path("/etc/edge-agent/config.yaml"))
ENV_PREFIX = "EDGE_AGENT_"
# EDGE_AGENT_ variables that are not config keys (the crash test's seed): not typos.
NOT_CONFIG_VARIABLES = frozenset({"EDGE_AGENT_CRASH_SEED"})

# A file holding a secret (a password, a token): refused unless only its owner can read it.
SECRET = {"secret": True}
SecretFile = Annotated[Path | None, Field(json_schema_extra=SECRET)]


class _Section(BaseModel):
    # allow_inf_nan off: `speed: nan` would pass every bound (a comparison with nan is false).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    # field name -> the EDGE_AGENT_ variable that set it, so a later check of the value
    # (a file that cannot be read) blames the variable, as validation does.
    _variables: dict[str, str] = PrivateAttr(default_factory=dict)


class TlsConfig(_Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class MqttConfig(_Section):
    embedded: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("factory", min_length=1, pattern=r"^[^#+/]+(/[^#+/]+)*$")
    shared_group: str | None = Field(None, pattern=r"^[^#+/]+$")
    username: str | None = None
    password_file: SecretFile = None
    tls: TlsConfig = TlsConfig()
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(30, ge=5, le=65535)
    session_expiry_s: int = Field(86400, ge=0)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_names_plain_topics(cls, value: str) -> str:
        # `$` topics are the broker's own ($SYS, $share): a prefix there is refused or shared.
        if value.startswith("$") or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("must not start with $ or contain spaces or control characters")
        return value

    @field_validator("password_file")
    @classmethod
    def _password_has_a_user(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # A password is sent only with a user name: without one it would be ignored silently.
        if value is not None and info.data.get("username") is None:
            raise ValueError("a password file needs mqtt.username (the user it is the password of)")
        return value

    @model_validator(mode="after")
    def _embedded_speaks_311(self) -> MqttConfig:
        if self.embedded and self.protocol == "5":
            raise ValueError('the embedded broker (amqtt) speaks MQTT 3.1.1 only: set protocol: "3.1.1"')
        return self


class LogConfig(_Section):
    synchronous: Literal["full", "normal"] = "full"
    snapshot_every: int = Field(1000, ge=10)
    retention: Literal["keep", "archive", "drop"] = "keep"


class LimitsConfig(_Section):
    max_payload_bytes: int = Field(65536, ge=256)
    max_open_items: int = Field(10000, ge=1)
    min_free_mb: int = Field(50, ge=0)  # below this free space, no order is taken


class HttpConfig(_Section):
    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(9091, ge=1, le=65535)


class Config(BaseSettings):
    """The whole `config.yaml`; unknown keys are errors (a typo must not pass silently)."""

    model_config = SettingsConfigDict(
        env_prefix="EDGE_AGENT_", env_nested_delimiter="__", extra="forbid", frozen=True, allow_inf_nan=False
    )
    _variables: dict[str, str] = PrivateAttr(default_factory=dict)  # as in _Section

    device_id: str = Field(default_factory=socket.gethostname, min_length=1, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    data_dir: Path = Path("./var")
    profile: Path = Path("device_profiles/simulated.yaml")

    @field_validator("profile")
    @classmethod
    def _profile_names_a_file(cls, value: Path) -> Path:
        if value == Path():  # "" or ".": the config's own folder
            raise ValueError("must name a profile file")
        return value

    speed: float = Field(1.0, gt=0, le=10_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    telemetry_interval_s: float = Field(5.0, gt=0)
    mqtt: MqttConfig = MqttConfig()
    log: LogConfig = LogConfig()
    limits: LimitsConfig = LimitsConfig()
    http: HttpConfig = HttpConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the values load_config passes in: it merges the environment into the file
        # itself, so that it can name the variable behind a bad value and refuse a typo.
        return (init_settings,)

    @property
    def events_db(self) -> Path:
        return self.data_dir / "events.db"


def invalid(source: str, error: ValidationError, variables: Mapping[tuple[str, ...], str] | None = None) -> ConfigError:
    """One line naming the first offending key (and the variable, if one set it); unknown
    keys first, as a typo there is the likeliest cause of the other errors."""
    errors = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    key = ".".join(loc) or "(top level)"
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    if first["type"] == "finite_number":  # nan or inf: pydantic's message does not say which was given
        message = f"must be a finite number, not {first['input']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    blamed = next((name for path, name in (variables or {}).items() if loc[: len(path)] == path), source)
    return ConfigError(f"{blamed}: {key}: {message}{more}", key=key)


def find_config(path: Path | None) -> Path | None:
    """The file `--config` names, else the first default that exists (else None)."""
    if path is not None:
        if path.is_dir():
            raise ConfigError(f"--config: {path} is a folder, not a file; name the config file in it", key="--config")
        if not path.exists():
            raise ConfigError(f"config file {path} not found", key="--config")
        return path
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def _is_key(model: type[BaseModel], path: tuple[str, ...]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    section = field.annotation
    return isinstance(section, type) and issubclass(section, BaseModel) and _is_key(section, path[1:])


def environment_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    """key path -> (variable, value) for every EDGE_AGENT_ variable; one naming no key is an error."""
    found = {}
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in NOT_CONFIG_VARIABLES:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(path) or not _is_key(Config, path):
            raise ConfigError(
                f"{name}: unknown key {'.'.join(path)!r} (the environment sets keys as "
                f"{ENV_PREFIX}<KEY> or {ENV_PREFIX}<SECTION>__<KEY>)",
                key=name,
            )
        found[path] = (name, value)
    return found


def _merge(values: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    for part in path[:-1]:
        section = values.get(part)
        values[part] = section = dict(section) if isinstance(section, dict) else {}
        values = section
    values[path[-1]] = value


def _resolved(model: BaseModel, root: Path) -> Any:
    """`model` with every relative path field (at any depth) taken from `root`."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = root / value
        elif isinstance(value, BaseModel):
            update[name] = _resolved(value, root)
    return model.model_copy(update=update)


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """PyYAML's several-line report as one line: the problem and where it is."""
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(part for part in (error.context, error.problem) if part)


def load_config(path: Path | None) -> Config:
    """Read and validate the config; a ConfigError names the offending key."""
    found = find_config(path)
    values = read_yaml(found, "config", "--config") if found is not None else {}
    overrides = environment_overrides(os.environ)
    for key_path, (_, value) in overrides.items():
        _merge(values, key_path, value)
    source = str(found) if found else "config"
    try:
        config = Config(**values)
    except ValidationError as error:
        raise invalid(source, error, {key_path: name for key_path, (name, _) in overrides.items()}) from error
    for key_path, (name, _) in overrides.items():
        _section(config, key_path[:-1])._variables[key_path[-1]] = name
    return config if found is None else _resolved(config, found.parent)


MAX_YAML_BYTES = 1_000_000  # far more than any config or profile; a bigger file is not one
MAX_YAML_VALUES = 100_000  # values once aliases are expanded: a few aliases, not an alias bomb


def read_yaml(path: Path, what: str, key: str) -> dict[str, Any]:
    """The mapping a config or profile file holds; a ConfigError for a file that is not a
    regular file, is too big, is not YAML, repeats a key or expands past MAX_YAML_VALUES."""
    if not path.is_file():  # a FIFO would block the read, a device never end it
        raise ConfigError(f"{path}: the {what} is not a regular file", key=key)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too big for a {what} ({MAX_YAML_BYTES} at most)", key=key)
        text = path.read_text(encoding="utf-8")
        refuse_repeated_keys(path, yaml.compose(text, Loader=yaml.SafeLoader), budget=[MAX_YAML_VALUES])
        values = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}", key=key) from error
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the {what}: {error}", key=key) from error
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the {what} must be a mapping of keys to values", key=key)
    return values


def refuse_repeated_keys(path: Path, node: yaml.Node | None, prefix: str = "", *, budget: list[int]) -> None:
    """A key given twice in one mapping (at any depth) is a ConfigError naming it: YAML
    loaders keep the last one, so a fix made higher up in the file would silently not count.
    Every value met counts against `budget` (aliases each time they are met)."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"{path}: more than {MAX_YAML_VALUES} values once its aliases are expanded")
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            refuse_repeated_keys(path, item, prefix, budget=budget)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else None
        if key is not None and key_node.tag != "tag:yaml.org,2002:merge":
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}: {key}: given twice (lines {seen[key]} and {line})", key=key)
            seen[key] = line
        refuse_repeated_keys(path, value_node, f"{key}." if key is not None else prefix, budget=budget)


def _section(config: Config, path: tuple[str, ...]) -> _Section | Config:
    found: _Section | Config = config
    for name in path:
        found = getattr(found, name)
    return found


def blame(model: BaseModel, name: str, key: str, problem: str) -> ConfigError:
    """A ConfigError about field `name` of `model` (dotted `key`), naming the environment
    variable that set it, if one did: `EDGE_AGENT_MQTT__TLS__CA_FILE: mqtt.tls.ca_file: ...`."""
    variable = model._variables.get(name) if isinstance(model, _Section | Config) else None
    return ConfigError(f"{variable}: {key}: {problem}" if variable else f"{key}: {problem}", key=key)


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """Every key whose value differs between two configs, dotted (`mqtt.port`)."""
    found = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        if isinstance(before, BaseModel) and isinstance(after, BaseModel):
            found += changed_keys(before, after, f"{prefix}{name}.")
        elif before != after:
            found.append(f"{prefix}{name}")
    return found


def check_files(model: BaseModel, prefix: str = "") -> None:
    """Every `*_file` key that is set names a readable file, and a secret one (SecretFile)
    belongs to the agent's user (or root) and is readable by its owner only: a ConfigError
    naming the key (and the variable that set it) otherwise. Run before anything is opened,
    so that a missing certificate is a config error, not a crash."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            check_files(value, f"{key}.")
        elif isinstance(value, Path) and name.endswith("_file"):
            try:
                status = value.stat()
            except OSError as error:
                raise blame(model, name, key, f"cannot read {value}: {error.strerror}") from error
            mode = status.st_mode
            if not stat.S_ISREG(mode):
                raise blame(model, name, key, f"{value} is not a file")
            if field.json_schema_extra != SECRET:
                continue
            if status.st_uid not in (os.geteuid(), 0):
                user = _user_name(os.geteuid())
                raise blame(
                    model,
                    name,
                    key,
                    f"{value} belongs to {_user_name(status.st_uid)}, not to the agent's user {user}; "
                    f"run: chown {user} {value}",
                )
            if mode & 0o077:
                raise blame(
                    model,
                    name,
                    key,
                    f"{value} is open to group or others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {value}",
                )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no account (a file from another machine)
        return f"uid {uid}"
