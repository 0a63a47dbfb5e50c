"""The MQTT topics of one device (the README's "MQTT contract")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    device_id: str
    shared_group: str | None = None

    @property
    def orders(self) -> str:
        """The fleet's order queue, shared between devices when a group is set."""
        topic = f"{self.prefix}/orders"
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic

    def _own(self, name: str) -> str:
        return f"{self.prefix}/{self.device_id}/{name}"

    @property
    def device_orders(self) -> str:
        return self._own("orders")

    @property
    def commands(self) -> str:
        return self._own("cmd/#")

    @property
    def cancel(self) -> str:
        return self._own("cmd/cancel")

    @property
    def rebirth(self) -> str:
        return self._own("cmd/rebirth")

    @property
    def status(self) -> str:
        return self._own("status")

    @property
    def events(self) -> str:
        return self._own("events")

    @property
    def inventory(self) -> str:
        return self._own("inventory")

    @property
    def rejected(self) -> str:
        return self._own("orders/rejected")

    @property
    def state(self) -> str:
        return self._own("state")

    @property
    def telemetry(self) -> str:
        return self._own("telemetry")

    def is_order(self, topic: str) -> bool:
        return topic in (f"{self.prefix}/orders", self.device_orders)
