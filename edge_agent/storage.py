"""Whether the event log can be written now, and telling those who care when that changes.

When the log cannot be written (an I/O error, a full disk) or free space is
below `limits.min_free_mb`, nothing may happen that the log would not know of:
the agent turns every output off and takes no order (so none is acknowledged
and the broker keeps them), and every `retry_s` it tries the disk again,
resuming by itself once a write succeeds.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from edge_agent.errors import LogError

log = logging.getLogger(__name__)

FAULT_RETRY_S = 1.0  # how often a storage fault is checked again

FaultObserver = Callable[[str | None], None]  # told the fault when one starts or changes, None when it ends


class StorageGuard:
    def __init__(
        self,
        data_dir: Path,
        min_free_mb: int,
        retry_s: float = FAULT_RETRY_S,
        free_mb: Callable[[Path], float] = lambda folder: shutil.disk_usage(folder).free / 1e6,
    ) -> None:
        """`free_mb(folder)`: the room left on the folder's file system, in MB."""
        self._data_dir = data_dir
        self._min_free_mb = min_free_mb
        self.retry_s = retry_s
        self._free_mb = free_mb
        self._fault: str | None = None
        self._observers: list[FaultObserver] = []

    @property
    def fault(self) -> str | None:
        """Why the log cannot be written now (None: it can)."""
        return self._fault

    def add_observer(self, observer: FaultObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: FaultObserver) -> None:
        self._observers.remove(observer)

    def check_space(self) -> None:
        """LogError if free space is below the floor: before a write that takes orders."""
        free_mb = self._free_mb(self._data_dir)
        if free_mb < self._min_free_mb:
            raise LogError(f"{free_mb:.0f} MB free on {self._data_dir}, below the floor of {self._min_free_mb} MB")

    def failed(self, reason: str) -> None:
        """A write failed (or would have): in the fault until `probe` succeeds."""
        if self._fault is None:
            log.error("cannot write the event log, outputs off and no orders taken until it can: %s", reason)
        if reason != self._fault:
            self._fault = reason
            self._tell(reason)

    def probe(self, write: Callable[[], None]) -> None:
        """In a fault: is there room again, and does `write` (a real commit) succeed? Then resume."""
        try:
            self.check_space()
            write()
        except LogError as error:
            self.failed(str(error))
            return
        log.warning("the event log is writable again: resuming")
        self._fault = None
        self._tell(None)

    def _tell(self, fault: str | None) -> None:
        for observer in tuple(self._observers):  # one may remove itself
            observer(fault)
