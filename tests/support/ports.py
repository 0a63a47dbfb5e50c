"""Free ports and listening ones on 127.0.0.1, for the tests and the benchmarks alike
(nothing here needs pytest)."""

from __future__ import annotations

import socket
import time

from tests.support import WAIT_S


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = WAIT_S) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # a separate process: nothing to wait on but the port itself
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
