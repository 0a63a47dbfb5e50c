"""Lock step with an in-process agent, for the chaos tests: a machine behind its mock
pins that moves only while the agent is idle (so every run commits the same things in
the same order), and a witness of everything the agent lets out (acknowledgements,
publishes, outputs) that notes whatever comes before its event is committed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress

import orjson

from edge_agent.agent import Agent
from edge_agent.domain import commands as cmd
from edge_agent.domain.events import Recorded
from edge_agent.domain.outputs import desired_outputs
from edge_agent.log.store import OUTBOX_CURSOR
from edge_agent.mqtt.outbox import Outbox
from edge_agent.mqtt.topics import Topics
from tests.support import WAIT_S
from tests.support.io_faults import Disk


class Changes:
    """Wakes whoever waits, at every commit, output change, fault, refused write or ack."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def next(self) -> asyncio.Event:
        """The event the next notification sets (take it before causing the change)."""
        return self._event


class Witness:
    """Watches one agent from outside: its acknowledgements, its publishes (through the
    real outbox, fed from the log as the gateway feeds it; the broker's side is played
    here, acknowledging every message at once) and its outputs. Anything that happens
    before its event is committed, or while the disk is broken, is a violation."""

    def __init__(self, agent: Agent, disk: Disk | None, *, outbox: bool = True) -> None:
        self.agent = agent
        self.disk = disk
        self.task: asyncio.Task[None] | None = None  # the agent's run, once started
        self.closed = False
        self.changes = Changes()
        self.violations: list[str] = []
        self.acked: list[tuple[str, list[Recorded]]] = []  # (order id, the events it was acked on)
        self.published: list[dict[str, object]] = []  # events as published on {p}/{d}/events
        self.faults: list[str | None] = []
        self.offers = 0
        self._mid = 0
        self._loop = asyncio.get_running_loop()
        agent.devices.watch(self._output_changed)
        agent.add_observer(lambda commit: self.changes.notify())
        agent.storage.add_observer(self._fault_changed)
        if disk is not None:
            disk.on_refused = self.changes.notify
        self.outbox: Outbox | None = None
        if outbox:
            self.topics = Topics(agent.config.mqtt.topic_prefix, agent.config.device_id)
            self.outbox = Outbox(agent, self._publish, self.topics, agent.config.device_id, cursor=OUTBOX_CURSOR)
            agent.add_observer(lambda commit: self._pump())
            self.outbox.connected()

    def close(self) -> None:
        """Before the agent closes its log: the broker's acknowledgements stop coming."""
        self.closed = True

    @property
    def broken(self) -> bool:
        return self.disk is not None and self.disk.broken

    def offer(self, order: cmd.SubmitOrder | cmd.RejectOrder) -> None:
        order_id = order.order_id or ""
        self.offers += 1
        self.agent.offer(order, lambda records: self._acked(order_id, records))

    def acked_ids(self) -> Counter[str]:
        return Counter(order_id for order_id, _ in self.acked)

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    wake = self.changes.next()
                    if self.task is not None and self.task.done():
                        self.task.result()  # the agent crashed: its error is the failure
                        raise AssertionError("the agent stopped running")
                    await wake.wait()
        except TimeoutError:
            raise AssertionError(f"not within {timeout:g} s: {what}") from None

    # -- what the agent does ---------------------------------------------------------------

    def _acked(self, order_id: str, records: list[Recorded]) -> None:
        if self.broken:
            self.violations.append(f"order {order_id} acknowledged while the disk is broken")
        state = self.agent.state
        known = order_id in self.agent.journal.known_orders([order_id])
        if any(r.seq > state.last_seq for r in records) or (not records and not known):
            self.violations.append(f"order {order_id} acknowledged before its outcome was committed")
        self.acked.append((order_id, records))
        self.changes.notify()

    def _publish(self, topic: str, payload: bytes) -> int:
        message = orjson.loads(payload)
        if topic == self.topics.events:
            if self.broken:
                self.violations.append(f"event {message['seq']} published while the disk is broken")
            if message["seq"] > self.agent.state.last_seq:
                self.violations.append(f"event {message['seq']} published before it was committed")
            self.published.append(message)
        self._mid += 1
        if not self.closed:
            self._loop.call_soon(self._puback, self._mid)
        return self._mid

    def _pump(self) -> None:
        if self.outbox is not None:
            self.outbox.pump()

    def _puback(self, mid: int) -> None:
        """The broker acknowledges a message (unless the agent has closed its log since)."""
        if self.outbox is not None and not self.closed:
            self.outbox.published(mid)

    def _output_changed(self, name: str, on: bool) -> None:
        if on and self.broken:
            self.violations.append(f"output {name} switched on while the disk is broken")
        if on and not desired_outputs(self.agent.state).get(name, False):
            self.violations.append(f"output {name} switched on before the event calling for it was committed")
        self.changes.notify()

    def _fault_changed(self, fault: str | None) -> None:
        self.faults.append(fault)
        self.changes.notify()


@contextmanager
def witnessing(agent: Agent, disk: Disk, *, outbox: bool = True) -> Iterator[Witness]:
    """A Witness of `agent` for the block, closed after it. If the block fails, the disk
    is healed first, so that the agent's shutdown does not hide what went wrong."""
    witness = Witness(agent, disk, outbox=outbox)
    try:
        yield witness
    except BaseException:
        disk.heal()
        raise
    finally:
        witness.close()


class Machine:
    """The cell behind the mock pins, in lock step with the agent: while a `run` output is
    on, that station finishes a unit; while the conveyor runs, the batch arrives. One input
    at a time, each only once the agent has taken in the one before (a commit, a fault or
    an output change), so every run makes the same commits in the same order."""

    def __init__(self, agent: Agent, changes: Changes) -> None:
        profile = agent.profile
        self._devices = agent.devices
        self._changes = changes
        self._inputs = {f"{s.id}.run": (f"{s.id}.unit_done", s.unit_done.bounce_time or 0.0) for s in profile.stations}
        self._inputs["lane.conveyor"] = ("lane.arrived", profile.lane.arrived.bounce_time or 0.0)
        self._last_pulse: dict[str, float] = {}
        self.pulses = 0

    async def run(self) -> None:
        while True:
            wake = self._changes.next()
            output = next((name for name in self._inputs if self._devices.is_on(name)), None)
            if output is None:
                await wake.wait()
                continue
            sensor, bounce_s = self._inputs[output]
            # A sensor cannot fire again within its debounce time (the agent would drop the
            # edge as chatter): a physical limit, so waiting it out is the machine's part.
            early = self._last_pulse.get(sensor, -1e9) + bounce_s * 2 - time.monotonic()
            if early > 0:
                await asyncio.sleep(early)
                continue  # look again: the agent may have moved on meanwhile
            wake = self._changes.next()
            self._devices.pulse_input(sensor)
            self._last_pulse[sensor] = time.monotonic()
            self.pulses += 1
            await wake.wait()


@asynccontextmanager
async def machine_running(agent: Agent, changes: Changes) -> AsyncIterator[Machine]:
    machine = Machine(agent, changes)
    task = asyncio.create_task(machine.run(), name="machine")
    try:
        yield machine
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
