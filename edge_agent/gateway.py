"""The agent's MQTT face: orders and commands in, acknowledged only after commit;
events, inventory and rejections out, from the log (the README's "MQTT contract").

Wires the `mqtt` package to a running `Agent`. paho's callbacks arrive on
paho's thread and are handed to the event loop at once; everything else runs on
the loop, beside the agent's control loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from edge_agent import __version__
from edge_agent.agent import Agent
from edge_agent.config import Config
from edge_agent.domain import commands as cmd
from edge_agent.domain.moments import iso
from edge_agent.domain.state import Stage
from edge_agent.domain.view import state_view
from edge_agent.errors import CommandRejected
from edge_agent.hooks import NO_HOOKS, Hooks
from edge_agent.log.store import OUTBOX_CURSOR
from edge_agent.mqtt.inbound import CancelRefused, cancel_command, order_command
from edge_agent.mqtt.link import Inbound, Link
from edge_agent.mqtt.outbox import Outbox
from edge_agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

CURSOR_SAVE_S = 1.0
_T = TypeVar("_T")


class _Handoff:
    """Calls from paho's thread, run on the event loop in the order they were made, with
    one wake-up of the loop per burst instead of one per message: each wake-up is a write
    to the loop's self-pipe (a system call on paho's thread) plus a loop handle, and at
    thousands of orders a second those cost more than reading the packets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[Any], object], Any]] = []

    def __call__(self, call: Callable[[_T], object], argument: _T) -> None:
        with self._lock:
            self._pending.append((call, argument))
            if len(self._pending) > 1:
                return  # a wake-up is already on its way and will take this one too
        self._loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        with self._lock:
            calls, self._pending = self._pending, []
        for call, argument in calls:
            try:
                call(argument)
            except Exception:  # as the loop would for a handle of its own: say so, go on with the rest
                log.exception("error handling %s from the broker", getattr(call, "__name__", call))


class Gateway:
    def __init__(self, agent: Agent, config: Config, hooks: Hooks = NO_HOOKS) -> None:
        self._agent = agent
        self._config = config
        self._hooks = hooks
        self._loop = asyncio.get_running_loop()
        self._started = agent.clock.monotonic()
        self.telemetry_interval_s = config.telemetry_interval_s  # SIGHUP may change it
        self._cancels: set[asyncio.Task[None]] = set()
        self.topics = Topics(config.mqtt.topic_prefix, config.device_id, config.mqtt.shared_group)
        self._handoff = handoff = _Handoff(self._loop)
        self.link = Link(
            config.mqtt,
            config.device_id,
            self.topics,
            will=self._status("offline", will=True),
            on_message=self._inbound,
            on_connection=lambda up: handoff(self._connection, up),
            on_published=lambda mid, refusal: handoff(self._published, (mid, refusal)),
        )
        self.outbox = Outbox(
            agent,
            self.link.publish,
            self.topics,
            config.device_id,
            cursor=OUTBOX_CURSOR,
            schedule=self._loop.call_later,
        )
        self.outbox.add_observer(lambda refusal: self._publish_status())
        agent.add_observer(lambda commit: self.outbox.pump())
        agent.storage.add_observer(lambda fault: self._publish_status())

    async def run(self) -> None:
        """Connect and serve until cancelled; then say `offline` and disconnect."""
        self.link.start()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._telemetry(), name="telemetry")
                tasks.create_task(self._save_cursor(), name="outbox cursor")
        finally:
            self.outbox.save()
            farewell = (self.topics.status, self._status("offline"))
            await asyncio.to_thread(self.link.stop, farewell)

    # -- from paho ---------------------------------------------------------------

    def _inbound(self, message: Inbound) -> None:
        """On paho's thread: handed to the loop at once."""
        self._hooks.received(message)
        self._handoff(self._received, message)

    # -- from paho (already on the loop) ----------------------------------------

    def _connection(self, up: bool) -> None:
        if not up:
            self.outbox.disconnected()
            return
        self._birth()
        self.outbox.connected()

    def _published(self, answer: tuple[int, str | None]) -> None:
        self.outbox.published(*answer)

    def _received(self, message: Inbound) -> None:
        topic = message.topic
        max_bytes = self._config.limits.max_payload_bytes
        if self.topics.is_order(topic):
            order = order_command(message.payload, self._agent.state.products, max_bytes)
            # Acknowledged once its outcome is committed; a duplicate (no records) too, and
            # nothing is sent again: how it went is on `events` and `inventory` already.
            # The service log tells the outcome from the commit (accepted, or why not).
            self._agent.offer(order, lambda records: self._ack(message))
        elif topic == self.topics.cancel:
            cancel = cancel_command(message.payload, max_bytes)
            if isinstance(cancel, CancelRefused):
                self._refuse_cancel(cancel.order_id, cancel.reason)
                self._ack(message)
            else:
                task = self._loop.create_task(self._cancel(cancel, message))
                self._cancels.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(self._cancels.discard)
        elif topic == self.topics.rebirth:
            self._birth()
            self._ack(message)
        else:  # an unknown command, or a retained message a broker sent unasked (amqtt does)
            log.log(logging.WARNING if "/cmd/" in topic else logging.DEBUG, "ignored a message on %s", topic)
            self._ack(message)

    async def _cancel(self, cancel: cmd.CancelOrder, message: Inbound) -> None:
        """Decide the cancel, then acknowledge it whatever the outcome: a cancel left
        unacknowledged is sent again at every reconnect and holds one of the broker's
        Receive Maximum slots. Only a stop (CancelledError) leaves it to be sent again."""
        try:
            await self._agent.request(cancel)
        except CommandRejected as error:
            self._refuse_cancel(cancel.order_id, error.reason)
        except Exception as error:
            log.exception("cancel of order %r failed", cancel.order_id)
            self._refuse_cancel(cancel.order_id, f"cannot be applied: {error}")
        self._ack(message)

    def _ack(self, message: Inbound) -> None:
        self._hooks.acking(message)
        self.link.ack(message)

    def _refuse_cancel(self, order_id: str | None, reason: str) -> None:
        """A cancel that cannot apply is answered where its sender hears of rejections
        (published directly: a refused cancel changes nothing, so nothing is logged)."""
        reason = f"cancel refused: {reason}"
        log.warning("%s", reason)
        answer = {"order_id": order_id, "reason": reason, "received_at": iso(self._agent.clock.now())}
        self.link.publish(self.topics.rejected, orjson.dumps(answer))

    # -- out ----------------------------------------------------------------------

    def _status(self, state: str, *, will: bool = False) -> bytes:
        """The retained status. No log position: a retained message is read long after it
        was sent, so `last_seq` is in telemetry and `state`, which are kept current."""
        since = None if will else iso(self._agent.clock.now())
        status: dict[str, Any] = {"state": state, "since": since, "version": __version__}
        if state == "online":
            if self._agent.fault is not None:
                status["fault"] = self._agent.fault  # online, but taking no orders: why
            if self.outbox.refusal is not None:
                status["refused"] = self.outbox.refusal  # online, but a message is not delivered: why
        return orjson.dumps(status)

    def _publish_status(self) -> None:
        status = self._status("online")
        self.link.publish(self.topics.status, status, retain=True)

    def _birth(self) -> None:
        """`online` with the log position, and the whole live state (both retained)."""
        state = self._agent.state
        self._publish_status()
        snapshot: dict[str, Any] = {"device_id": self._config.device_id, **state_view(state, self._agent.clock.now())}
        self.link.publish(self.topics.state, orjson.dumps(snapshot), retain=True)

    def telemetry(self) -> dict[str, Any]:
        state = self._agent.state
        items = state.work_items
        busy = [(s.id, items[s.order_id]) for s in state.stations if s.order_id is not None]
        return {
            "device_id": self._config.device_id,
            "ts": iso(self._agent.clock.now()),
            "stations": {"busy": len(busy), "free": len(state.stations) - len(busy)},
            "waiting": sum(1 for i in items.values() if i.stage is Stage.FACTORY_READY),
            "building": [
                {"order_id": item.order_id, "station": station, "progress": item.progress} for station, item in busy
            ],
            "shipped": state.inventory_seq,
            "last_seq": state.last_seq,
            "outbox_lag": state.last_seq - self.outbox.acked,
            "uptime_s": round(self._agent.clock.monotonic() - self._started, 3),
        }

    async def _telemetry(self) -> None:
        last_state_seq = -1
        while True:
            await asyncio.sleep(self.telemetry_interval_s)
            if not self.link.connected:
                continue
            self.link.publish(self.topics.telemetry, orjson.dumps(self.telemetry()), qos=0)
            state = self._agent.state
            if state.last_seq != last_state_seq:  # keep the retained snapshot current, not on every event
                view = {"device_id": self._config.device_id, **state_view(state, self._agent.clock.now())}
                self.link.publish(self.topics.state, orjson.dumps(view), retain=True)
                last_state_seq = state.last_seq

    async def _save_cursor(self) -> None:
        while True:
            await asyncio.sleep(CURSOR_SAVE_S)
            self.outbox.save()
