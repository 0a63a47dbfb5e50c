"""Points at which the code that starts an agent may watch it at work.

The test suite reports, from a child process, what reached the agent and what
it acknowledged, and kills it at chosen moments, through these rather than by
patching methods. Each hook runs synchronously where it is called and must not
raise; none is set in production.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_agent.devices.gpio import Devices
from edge_agent.domain import commands as cmd
from edge_agent.mqtt.link import Inbound


def _nothing(_: object) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Hooks:
    # An inbound message as the broker delivered it (on the MQTT client's thread).
    received: Callable[[Inbound], None] = _nothing
    # An inbound message whose outcome is committed, just before its acknowledgement.
    acking: Callable[[Inbound], None] = _nothing
    # Inbound orders about to be decided and committed as one group.
    deciding: Callable[[Sequence[cmd.SubmitOrder | cmd.RejectOrder]], None] = _nothing
    # The cell's devices, just created (every output off), before the log is opened.
    devices: Callable[[Devices], None] = _nothing


NO_HOOKS = Hooks()
