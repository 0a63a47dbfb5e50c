"""The systemd notification protocol (sd_notify): READY, WATCHDOG, STOPPING, STATUS.

A datagram of `KEY=value` lines to the AF_UNIX socket named in `NOTIFY_SOCKET`
(a leading `@` names an abstract socket). Written here because it is a dozen
lines and a package would bring a C build or an unmaintained wheel to the Pi.
Without `NOTIFY_SOCKET` (not run by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        for_us = pid is None or pid == str(os.getpid())
        # Ping at half the interval systemd waits, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval_s = int(usec) / 2e6 if usec and usec.isdigit() and for_us else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message, self._address)
            except OSError as error:  # systemd gone or socket full: the service goes on
                log.warning("cannot notify systemd: %s", error)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def stopping(self, status: str) -> None:
        self.notify(STOPPING=1, STATUS=status)

    def status(self, text: str) -> None:
        self.notify(STATUS=text)
