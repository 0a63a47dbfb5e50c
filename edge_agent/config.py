"""The agent's configuration: a pydantic model of `config.yaml` (SPEC §8).

The file is read once, then `EDGE_AGENT_<KEY>` / `EDGE_AGENT_<SECTION>__<KEY>`
environment variables override it. This is the only module that reads them.
Relative paths in the file are taken from the file's own folder, so the agent
finds its data wherever it is started from.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edge_agent.errors import ConfigError

DEFAULT_PATHS = (Path("config.yaml"), Path("/etc/edge-agent/config.yaml"))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    password_file: Path | None = None
    tls: TlsConfig = TlsConfig()
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(30, ge=5, le=65535)
    session_expiry_s: int = Field(86400, ge=0)

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

    model_config = SettingsConfigDict(env_prefix="EDGE_AGENT_", env_nested_delimiter="__", extra="forbid", frozen=True)

    device_id: str = Field(default_factory=socket.gethostname, min_length=1, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    data_dir: Path = Path("./var")
    profile: Path = Path("device_profiles/simulated.yaml")
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
        # The environment overrides the file (passed in as init values); nothing else is read.
        return env_settings, init_settings

    @property
    def events_db(self) -> Path:
        return self.data_dir / "events.db"


def invalid(source: str, error: ValidationError) -> ConfigError:
    """One line naming the first offending key; unknown keys first, as a typo
    there is the likeliest cause of the other errors."""
    errors = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {key}: {message}{more}", key=key)


def find_config(path: Path | None) -> Path | None:
    """The file `--config` names, else the first default that exists (else None)."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} not found", key="--config")
        return path
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def load_config(path: Path | None) -> Config:
    """Read and validate the config; a ConfigError names the offending key."""
    found = find_config(path)
    values: dict[str, Any] = {}
    if found is not None:
        try:
            values = yaml.safe_load(found.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"{found}: cannot read the config: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"{found}: the config must be a mapping of keys to values")
    source = str(found) if found else "config"
    try:
        config = Config(**values)
    except ValidationError as error:
        raise invalid(source, error) from error
    if found is None:
        return config
    root = found.parent
    return config.model_copy(update={"data_dir": root / config.data_dir, "profile": root / config.profile})
