"""The rig of the MQTT tests (tests/test_mqtt_faults.py, tests/test_chaos_*.py): the agent
in a child process on a real broker, its log read read-only from the test, and paho
clients of the test's own on the broker side.

The agent runs tests/support/mqtt_agent.py (`serve(config)`, its inbound messages and
acknowledgements reported on stdout). Waits are on MQTT messages or on the log's
contents, with timeouts; where another process writes a file, the file is polled.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.domain.state import inventory_id
from edge_agent.log.store import OUTBOX_CURSOR, EventLog, Row
from edge_agent.log.verify import verify
from tests.support import WAIT_S
from tests.support.agent_process import AgentProcess
from tests.support.configs import config_file
from tests.support.peer import PREFIX

SPEED = 50
POLL_S = 0.05  # another process writes the log: nothing to wait on but the file itself
ONCE_PER_ORDER = ("OrderAccepted", "InventoryIssued", "TidiedUp")


def unique(role: str) -> str:
    """A device id of its own for every agent of every test."""
    return f"{role}-{uuid.uuid4().hex[:8]}"


def agent_config(
    folder: Path, port: int, device_id: str, *, settings: Mapping[str, Any] | None = None, **mqtt: Any
) -> Path:
    """A config file for one agent on the simulated profile, its log under `folder`;
    `settings` overrides top-level keys (`speed`, `log`...), `mqtt` adds to the mqtt section."""
    rig_mqtt = {"port": port, "protocol": "5", "topic_prefix": PREFIX, **mqtt}
    return config_file(folder, **{"device_id": device_id, "speed": SPEED, "mqtt": rig_mqtt, **(settings or {})})


def events_db(config: Path) -> Path:
    return config.parent / "data" / "events.db"


# -- the log, read-only ------------------------------------------------------------------


def read_log(db: Path) -> list[Row]:
    if not db.exists():
        return []
    with EventLog(db, readonly=True) as log_:
        return list(log_.rows())


def subjects(rows: Sequence[Row], type_: str) -> Counter[str]:
    return Counter(row.subject for row in rows if row.type == type_)


def outbox_cursor(db: Path) -> int:
    with EventLog(db, readonly=True) as log_:
        return log_.cursor(OUTBOX_CURSOR) or 0


def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT_S, *alive: AgentProcess) -> None:
    """Poll `condition` (it reads files other processes write) until it holds; the agents
    in `alive` must not end meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        for agent in alive:
            agent.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)


def all_tidied(db: Path, ids: Sequence[str]) -> Callable[[], bool]:
    return lambda: set(subjects(read_log(db), "TidiedUp")) >= set(ids)


def check_each_once(rows: Sequence[Row], ids: Sequence[str]) -> None:
    """Every order accepted, issued and tidied up exactly once; nothing else went wrong."""
    for type_ in ONCE_PER_ORDER:
        counts = subjects(rows, type_)
        assert counts == dict.fromkeys(ids, 1), f"{type_} not exactly once per order: {counts}"
    trouble = [(row.type, row.subject) for row in rows if row.type in ("OrderRejected", "OrderFailed")]
    assert not trouble, f"orders went wrong: {trouble}"
    issued = [json.loads(row.data)["inventory_id"] for row in rows if row.type == "InventoryIssued"]
    assert issued == [inventory_id(n) for n in range(1, len(issued) + 1)], f"inventory ids skip or repeat: {issued}"


def check_intact(db: Path) -> None:
    with EventLog(db, readonly=True) as log_:
        verdict = verify(log_)
    assert verdict.fault is None, f"log verify: {verdict.fault}"


def orders_topic(device_id: str) -> str:
    return f"{PREFIX}/{device_id}/orders"
