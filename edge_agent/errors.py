"""The agent's error tree: one base, data in attributes, an exit code each.

Exit codes: 0 ok, 1 a failure found (or an unexpected error), 2 usage or config,
and for `edge-agent run` only: 3 the log cannot be taken over (damaged, from a
newer release, another workflow: a restart cannot help, so systemd does not
restart on it) and 4 the data folder cannot be written at start (a full disk, a
read-only file system, I/O errors).
"""

from __future__ import annotations

EXIT_LOG_REFUSED = 3
EXIT_STORAGE_FAULT = 4


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""

    exit_code = 1


class ConfigError(EdgeAgentError, ValueError):
    """A config file, profile or command-line value is invalid."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class CommandRejected(EdgeAgentError, ValueError):
    """A command cannot be carried out in the current state."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidEvent(EdgeAgentError, ValueError):
    """An event cannot be applied to the state (a broken or foreign log)."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"event {seq}: {message}")
        self.seq = seq


class LogError(EdgeAgentError):
    """The event log cannot be opened, read or written."""


class LogCorrupted(LogError):
    """The log fails verification; `seq` is the first bad position."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"seq {seq}: {message}")
        self.seq = seq


class StartRefused(EdgeAgentError):
    """The agent cannot start; the error that stopped it is the cause."""


class LogRefused(StartRefused):
    """The log cannot be taken over: damaged, written by a newer release or another workflow."""

    exit_code = EXIT_LOG_REFUSED


class StorageFault(StartRefused):
    """The data folder cannot be written at start: full, read-only or failing."""

    exit_code = EXIT_STORAGE_FAULT


class NewerLog(EdgeAgentError):
    """The log holds a format a newer release wrote (a migration, an event type or payload
    version, a snapshot format, a workflow version) that this release does not know: it
    is left exactly as it is."""

    exit_code = 2
