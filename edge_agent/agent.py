"""The agent runtime: wires log, devices, simulator and workflow in one TaskGroup.

The only module that knows every layer. Start-up order matters: the config and
profile are validated first (nothing touched yet), then every output is created
off, then the log is recovered and the workflow checked, and only then does
anything resume — its outputs re-driven from the recovered state.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent import __version__, cell, formats
from edge_agent.clock import Clock, SystemClock
from edge_agent.config import Config
from edge_agent.devices.gpio import Devices, Edge, make_pin_factory
from edge_agent.devices.profile import Profile, load_profile
from edge_agent.devices.simulator import Simulator
from edge_agent.domain import commands as cmd
from edge_agent.domain.events import Recorded
from edge_agent.domain.outputs import desired_outputs
from edge_agent.domain.state import Policy, State
from edge_agent.errors import ConfigError, LogError
from edge_agent.hooks import NO_HOOKS, Hooks
from edge_agent.lock import DataDirLock
from edge_agent.log.compact import Retention
from edge_agent.log.journal import Commit, CommitObserver, Journal
from edge_agent.log.retention import Budget, Keeper
from edge_agent.log.store import Row
from edge_agent.storage import StorageGuard
from edge_agent.workflow.engine import Workflow

log = logging.getLogger(__name__)


ORDER_BATCH = 256  # orders decided and committed in one transaction at most


@dataclass
class _Request:
    command: cmd.Command
    reply: asyncio.Future[list[Recorded]] | None = field(default=None)


@dataclass
class _Offer:
    """An inbound order; `committed` runs once its outcome is in the log (the MQTT ack)."""

    command: cmd.SubmitOrder | cmd.RejectOrder
    committed: Callable[[list[Recorded]], None]  # given the order's own committed events


def plant_command(profile: Profile, speed: float) -> cmd.ConfigurePlant:
    """What the profile tells the log about the plant; simulated time runs `speed` times faster."""
    scale = speed if profile.pin_factory == "mock" else 1.0
    t = profile.timeouts
    policy = Policy(
        unit_timeout_s=t.unit_timeout_s / scale,
        transit_timeout_s=t.transit_timeout_s / scale,
        retries=t.retries,
        backoff_s=t.backoff_s / scale,
        backoff_max_s=t.backoff_max_s / scale,
        fault_retried=tuple(s.id for s in profile.stations if s.on_fault == "retry"),
    )
    products = tuple(sorted(profile.max_qty().items()))
    return cmd.ConfigurePlant(tuple(s.id for s in profile.stations), products, policy)


def _edge_command(edge: Edge) -> cmd.Command | None:
    """What an input's edge asks of the workflow (None: nothing)."""
    if edge.name == cell.ESTOP:
        return cmd.EngageEstop() if edge.active else cmd.ReleaseEstop()
    if not edge.active:
        return None
    if edge.name == cell.ARRIVED:
        return cmd.RecordArrival()
    match cell.parse_station_input(edge.name):
        case (station, cell.UNIT_DONE):
            return cmd.RecordUnit(station)
        case (station, cell.FAULT):
            return cmd.RecordFault(station)
    raise ValueError(f"no command for the input {edge.name!r}")  # Devices creates no other inputs


def _check_own_file(db: Path) -> None:
    """The log must be a file of its own in data_dir, where its lock is: a link to another
    data_dir's log would let a second agent write it past that folder's lock."""
    if db.is_symlink() or (db.exists() and db.stat().st_nlink > 1):
        link = f"is a symbolic link to {db.resolve()}" if db.is_symlink() else "has other hard links"
        raise ConfigError(
            f"{db} {link}: the log must be a file of its own in data_dir, which its lock guards "
            "(set data_dir to the folder the log is in)",
            key="data_dir",
        )


class Agent:
    """One running cell. Use `async with Agent(config) as agent:` then `await agent.run()`."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        profile: Profile | None = None,
        lock: DataDirLock | None = None,
        storage: StorageGuard | None = None,
        hooks: Hooks = NO_HOOKS,
    ) -> None:
        """`lock`: the data folder's lock, held by the caller; without one the agent takes it.
        `storage`: how the disk is watched (by default, as the config says); `hooks`: see
        `edge_agent.hooks`."""
        self.config = config
        self._lock = lock
        self.profile = profile or load_profile(config.profile)
        self.clock = clock or SystemClock()
        self._requests: deque[_Request] = deque()
        self._orders: deque[_Offer] = deque()
        self._wake = asyncio.Event()
        self._committed_event = asyncio.Event()  # set (and replaced) at every commit
        self._driving = False  # outputs follow the state only while running
        self._hooks = hooks
        self.storage = storage or StorageGuard(config.data_dir, config.limits.min_free_mb)
        self.storage.add_observer(self._storage_changed)
        self._stack = AsyncExitStack()
        self.devices: Devices
        self.journal: Journal
        self.workflow: Workflow
        self.simulator: Simulator | None = None
        self.retention: Keeper

    async def __aenter__(self) -> Agent:
        try:
            self._start()
        except BaseException:
            await self._stack.aclose()  # a failed start-up still releases the pins and the log
            raise
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._lock is None:  # one writer per log, before any pin or the log is touched
            self._stack.enter_context(DataDirLock(self.config.data_dir))
        pin_factory: Any = make_pin_factory(self.profile.pin_factory)
        self._stack.callback(pin_factory.close)
        # First thing: every output exists and is off, before the log says anything.
        self.devices = Devices(self.profile, pin_factory, loop, self._on_edge)
        self._stack.callback(self.devices.close)
        self._hooks.devices(self.devices)
        _check_own_file(self.config.events_db)
        formats.refuse_newer(self.config.events_db)  # by what the log says of its writers, unchanged
        self.journal = Journal.open(  # a damaged log, or a newer shape in it, refused unchanged too
            self.config.events_db,
            synchronous=self.config.log.synchronous,
            snapshot_every=self.config.log.snapshot_every,
            clock=self.clock,
        )
        self._stack.callback(self.journal.close)
        self.journal.log.record_writer(__version__, formats.formats_json())
        kept = self.config.log
        budget = Budget(Retention(kept.retention), kept.max_mb, kept.keep_days, kept.archive_max_mb)
        self.retention = Keeper(
            self.journal.log, budget, self.config.data_dir / "archive", self.clock, writable=lambda: self.fault is None
        )
        self.workflow = Workflow(self.journal, self.clock, max_open_items=self.config.limits.max_open_items)
        self.workflow.check()
        self.journal.add_observer(self._committed)
        self.workflow.execute(cmd.RecordStart(__version__, self.profile.name))
        self.workflow.execute(plant_command(self.profile, self.config.speed))
        # The e-stop input as it is now, whatever the log last said.
        self.workflow.execute(cmd.EngageEstop() if self.devices.estop_active else cmd.ReleaseEstop())
        self.workflow.execute(cmd.RearmTimers())
        if self.profile.pin_factory == "mock":
            self.simulator = Simulator(self.profile, self.devices, self.config.speed, self._seconds_per_unit)
        state = self.state
        log.info(
            "edge-agent %s on %s: profile %s, log at seq %d, %d work items to resume",
            __version__,
            self.config.device_id,
            self.profile.name,
            state.last_seq,
            len(state.work_items),
        )

    async def __aexit__(self, *exc_info: object) -> None:
        self._driving = False
        self.devices.all_off()
        try:
            self.workflow.execute(cmd.RecordStop("shutdown"))
        finally:
            await self._stack.aclose()
        log.info("stopped: outputs off, log closed")

    # -- reading (a LogReader) ---------------------------------------------------

    @property
    def state(self) -> State:
        return self.journal.state

    @property
    def fault(self) -> str | None:
        """Why the log cannot be written now (None: it can)."""
        return self.storage.fault

    def rows(
        self, from_seq: int = 1, to_seq: int | None = None, *, subject: str | None = None, limit: int | None = None
    ) -> Iterator[Row]:
        return self.journal.log.rows(from_seq, to_seq, subject=subject, limit=limit)

    def cursor(self, name: str) -> int | None:
        return self.journal.log.cursor(name)

    def save_cursor(self, name: str, seq: int) -> None:
        self.journal.log.save_cursor(name, seq)

    def add_observer(self, observer: CommitObserver) -> None:
        self.journal.add_observer(observer)

    def remove_observer(self, observer: CommitObserver) -> None:
        self.journal.remove_observer(observer)

    async def next_commit(self) -> State:
        await self._committed_event.wait()
        return self.state

    async def wait_until(self, condition: Callable[[State], bool]) -> State:
        """Wait for a committed state that satisfies `condition`."""
        while not condition(self.state):
            await self._committed_event.wait()
        return self.state

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled: the control loop and, for simulated profiles, the machine."""
        self._driving = True
        self.devices.apply(desired_outputs(self.state))
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._control(), name="control")
            tasks.create_task(self.retention.run(), name="retention")
            if self.simulator is not None:
                tasks.create_task(self.simulator.run(), name="simulator")

    async def _control(self) -> None:
        """The single writer: inputs and requests in, decisions committed, work advanced;
        in a storage fault (see `edge_agent.storage`), only tries of the disk."""
        while True:
            if self.storage.fault is not None:  # not `_step`: it could wait for input that never comes
                await asyncio.sleep(self.storage.retry_s)
                self.storage.probe(self._prove_writable)
                continue
            try:
                await self._step()
            except LogError as error:
                self.storage.failed(str(error))

    async def _step(self) -> None:
        self.workflow.advance()
        self._wake.clear()
        if self._requests:
            self._handle(self._requests.popleft())
        elif self._orders:
            self._take_orders()
        else:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            try:
                async with asyncio.timeout(self.workflow.next_wake()):
                    await self._wake.wait()
            except TimeoutError:
                self._handle(_Request(cmd.Tick(self.workflow.due())))

    def _prove_writable(self) -> None:
        self.workflow.execute(cmd.RearmTimers())  # a real commit; the outputs were off meanwhile
        self.journal.log.probe_write()

    def _storage_changed(self, fault: str | None) -> None:
        """Outputs off in a storage fault; on again, from the state, once it is over."""
        self._driving = fault is None
        if fault is not None:
            self.devices.all_off()
            return
        self.devices.apply(desired_outputs(self.state))
        self._wake.set()

    def _handle(self, request: _Request) -> None:
        if request.reply is not None and request.reply.done():
            return  # its caller gave up waiting (during a storage fault): nobody wants it now
        try:
            records = self.workflow.execute(request.command)
        except LogError:
            # Kept, not lost: decided again once the log can be written (a sensor's edge
            # that will not come twice, a cancel waiting for its answer). Not a timer's
            # tick: after a fault every timer starts afresh.
            if not isinstance(request.command, cmd.Tick):
                self._requests.appendleft(request)
            raise
        except Exception as error:
            if request.reply is None:
                raise
            request.reply.set_exception(error)
        else:
            if request.reply is not None:
                request.reply.set_result(records)

    def _take_orders(self) -> None:
        """Decide waiting orders as one group commit, then acknowledge each. Nothing waits
        here for room in the cell: the log is the queue, and past `limits.max_open_items`
        an order is rejected, so the sender knows and the broker holds nothing for us."""
        self.storage.check_space()
        batch = [self._orders.popleft() for _ in range(min(len(self._orders), ORDER_BATCH))]
        orders = [offer.command for offer in batch]
        self._hooks.deciding(orders)
        try:
            records = self.workflow.execute_batch(orders)
        except LogError:
            self._orders.extendleft(reversed(batch))  # not acknowledged: taken again once the log works
            raise
        by_subject: dict[str, list[Recorded]] = {}
        for record in records:
            by_subject.setdefault(record.event.subject, []).append(record)
        for offer in batch:
            offer.committed(by_subject.get(offer.command.order_id or "", []))

    def _committed(self, commit: Commit) -> None:
        if self._driving:
            self.devices.apply(desired_outputs(commit.state))
        # Wake every waiter on the event they hold, and give later waiters a fresh one:
        # one attribute swap per commit, no task.
        self._committed_event.set()
        self._committed_event = asyncio.Event()

    def _on_edge(self, edge: Edge) -> None:
        command = _edge_command(edge)
        if command is not None:
            self._requests.append(_Request(command))
            self._wake.set()

    def _seconds_per_unit(self, station_id: str) -> float:
        station = self.state.station(station_id)
        item = self.state.work_items.get(station.order_id) if station and station.order_id else None
        product = item.product_id if item else ""
        return self.profile.seconds_per_unit_for(station_id, product)

    # -- the in-process API ---------------------------------------------------

    async def request(self, command: cmd.Command) -> list[Recorded]:
        """Have the control loop decide and commit `command`; its events once committed."""
        reply: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._requests.append(_Request(command, reply))
        self._wake.set()
        return await reply

    def offer(self, order: cmd.SubmitOrder | cmd.RejectOrder, committed: Callable[[list[Recorded]], None]) -> None:
        """Queue an inbound order; `committed(events)` is called once its outcome is in the log."""
        self._orders.append(_Offer(order, committed))
        self._wake.set()

    async def submit(self, order: cmd.SubmitOrder | cmd.RejectOrder) -> list[Recorded]:
        """Submit an order in-process; its events once committed (none for a redelivery)."""
        done: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self.offer(order, done.set_result)
        return await done

    async def cancel(self, order_id: str) -> list[Recorded]:
        return await self.request(cmd.CancelOrder(order_id))
