"""The embedded broker (amqtt) for a device that runs alone, as in `make run`.

amqtt speaks MQTT 3.1.1 only; it is bound to 127.0.0.1 so nothing outside the
device can reach it. It lives inside the agent's event loop: the Broker object
must be built there.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType
from typing import Any

from amqtt.broker import Broker

from edge_agent.errors import ConfigError

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """`async with EmbeddedBroker(port):` runs an MQTT broker on 127.0.0.1:port."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    async def __aenter__(self) -> EmbeddedBroker:
        self._check_port_free()
        # Plugins named explicitly: left out, amqtt loads slow defaults; `{}` refuses every client.
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await self._broker.start()
        log.info("embedded MQTT broker on %s:%d", self.host, self.port)
        return self

    def _check_port_free(self) -> None:
        """Say clearly, before amqtt logs a traceback, that the port is taken."""
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as error:
                raise ConfigError(
                    f"cannot start the embedded MQTT broker: {self.host}:{self.port} is taken ({error.strerror}); "
                    "if a broker already runs there, use it with mqtt.embedded: false "
                    "(or EDGE_AGENT_MQTT__EMBEDDED=false)",
                    key="mqtt.port",
                ) from error

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._broker.shutdown()
