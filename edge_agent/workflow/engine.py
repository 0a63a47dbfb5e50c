"""Runs every work item's workflow against the journal: resume, advance, time out.

Synchronous on purpose: the agent's event loop calls `execute` for each input
and request, then `advance` until nothing is left to do, and sleeps until
`next_wake`. Every decision is a pure function of the state and its input, and
is committed before it has any effect. Three kinds are made: a command's, by
`decide`; a new order's, by `admit`, which also needs what this engine reads
for it (the log's idempotency record and the open-item limit); and a workflow
step's completion, by that step's own `done` test (`steps.py`), which emits
`StepCompleted` (and, at the last step, `TidiedUp`) here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from edge_agent import __version__
from edge_agent.clock import Clock
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.decide import admit, decide
from edge_agent.domain.events import Recorded
from edge_agent.domain.evolve import fold
from edge_agent.domain.moments import iso, parse
from edge_agent.domain.state import Stage, State, WorkItem
from edge_agent.errors import EdgeAgentError
from edge_agent.workflow.steps import WORKFLOW_VERSION, WORKFLOWS, steps_of

log = logging.getLogger(__name__)

_ENDED = frozenset({Stage.FAILED, Stage.CANCELLED})
_MAX_PASSES = 10_000  # a safety net: each round moves some item on, so this is never reached


def _ahead(state: State, events: Sequence[ev.Event], now: datetime) -> State:
    """What `events`, not yet committed, will lead to (with the seqs they will get)."""
    at = iso(now)
    return fold(state, [Recorded(state.last_seq + i, at, event) for i, event in enumerate(events, 1)])


class WorkflowMismatch(EdgeAgentError):
    """The log records a workflow this release does not have: a newer release's step list
    (or steps that match none of this release's lists)."""

    exit_code = 2


class Ledger(Protocol):
    """Where decisions are committed: the log's journal (kept abstract so the layers stay apart)."""

    @property
    def state(self) -> State: ...

    def append(self, events: Sequence[ev.Event]) -> list[Recorded]: ...

    def known_orders(self, order_ids: Iterable[str]) -> Mapping[str, str]:
        """The digest recorded for each of `order_ids` that was ever accepted."""
        ...


class Workflow:
    def __init__(self, journal: Ledger, clock: Clock, *, max_open_items: int | None = None) -> None:
        self.journal = journal
        self._clock = clock
        self.max_open_items = max_open_items  # past it, new orders are rejected (None: no limit)
        self.duplicates = 0  # orders that came again with the same body: acknowledged, nothing logged
        self._timers: dict[str, tuple[str, float]] = {}  # order id -> (logged deadline, monotonic due time)
        # The items to look at again: an item's next step and its timer depend on the item
        # alone, so only items that events have touched since the last look can have moved.
        # (Scanning every live item on each commit would make a long queue quadratic.)
        self._to_step: set[str] = set(journal.state.work_items)
        self._to_time: set[str] = set(journal.state.work_items)

    @property
    def state(self) -> State:
        return self.journal.state

    def check(self) -> None:
        """Refuse to resume items that follow a step list this release does not have."""
        for item in self.state.work_items.values():
            steps = steps_of(item)
            if steps is None:
                raise WorkflowMismatch(
                    f"order {item.order_id} follows workflow v{item.workflow}, written by a newer release; "
                    f"this is edge-agent {__version__}, whose workflows are v1..v{WORKFLOW_VERSION}"
                )
            names = tuple(step.name for step in steps)
            for number, (recorded, expected) in enumerate(zip(item.steps_done, names, strict=False)):
                if recorded != expected:
                    raise WorkflowMismatch(
                        f"order {item.order_id}: step {number} is recorded as {recorded!r} but step {number} "
                        f"of workflow v{item.workflow or WORKFLOW_VERSION} is {expected!r}; "
                        "the log was written by another workflow"
                    )
            if len(item.steps_done) > len(names):
                raise WorkflowMismatch(f"order {item.order_id}: more steps recorded than its workflow has")

    def _commit(self, events: Sequence[ev.Event]) -> list[Recorded]:
        records = self.journal.append(events)
        for record in records:
            if isinstance(record.event, ev.EstopReleased):  # it moved every deadline
                self._to_time.update(self.state.work_items)
            self._to_step.add(record.event.subject)
            self._to_time.add(record.event.subject)
        return records

    def execute(self, command: cmd.Command) -> list[Recorded]:
        """Decide `command` now and commit the result (CommandRejected if it does not apply)."""
        if isinstance(command, cmd.SubmitOrder):  # decided against the idempotency record
            return self.execute_batch([command])
        return self._commit(decide(self.state, command, self._clock.now()))

    def execute_batch(self, orders: Sequence[cmd.SubmitOrder | cmd.RejectOrder]) -> list[Recorded]:
        """Decide each order in turn and commit them all in one transaction (a group commit).

        An order is decided against the idempotency record (one indexed query for the
        whole batch, plus what this batch accepts, for an id that comes twice in it) and
        the number of open items: a duplicate adds nothing, a conflict or a full queue is
        a rejection, anything else is accepted."""
        now = self._clock.now()
        known = dict(self.journal.known_orders(o.order_id for o in orders if isinstance(o, cmd.SubmitOrder)))
        open_items = len(self.state.work_items)
        events: list[ev.Event] = []
        duplicates = 0
        for order in orders:
            if isinstance(order, cmd.RejectOrder):
                events += decide(self.state, order, now)
                continue
            decided = admit(order, known.get(order.order_id), open_items=open_items, max_open=self.max_open_items)
            if not decided:
                duplicates += 1
            elif isinstance(decided[0], ev.OrderAccepted):
                known[order.order_id] = order.digest
                open_items += 1
            events += decided
        records = self._commit(events)
        self.duplicates += duplicates  # counted once committed: a batch that failed is taken again
        return records

    def advance(self) -> None:
        """Move every item and the cell forward until nothing more can happen now, and
        commit all of it at once: each round of moves is decided on the state the rounds
        before it lead to, so a batch of new orders is validated, stepped and put on the
        free stations in one transaction."""
        now = self._clock.now()
        state = self.state
        events: list[ev.Event] = []
        touched = set(self._to_step)  # cleared only once all is committed: nothing is missed after an error
        for _ in range(_MAX_PASSES):
            moves: list[ev.Event] = []
            for order_id in sorted(touched):  # sorted: the same log for the same inputs
                item = state.work_items.get(order_id)
                if item is not None:
                    moves += self._step(state, item, now)
            if not moves:  # the cell's own moves, once every item has caught up
                moves = decide(state, cmd.AssignStations(), now) or decide(state, cmd.StartShipment(), now)
            if not moves:
                break
            state = _ahead(state, moves, now)
            events += moves
            touched = {event.subject for event in moves}
        if events:
            self._commit(events)
        self._to_step.clear()  # every item moved here was looked at again after its last move

    def _step(self, state: State, item: WorkItem, now: datetime) -> list[ev.Event]:
        if item.stage in _ENDED:  # failed or cancelled: the workflow ends; only the tidy-up is left
            return decide(state, cmd.TidyUp(item.order_id), now)
        version = item.workflow if item.workflow is not None else WORKFLOW_VERSION
        step_number = len(item.steps_done)
        step = WORKFLOWS[version][step_number]  # known: `check` refused any other at start
        if step.done(item):
            completed: list[ev.Event] = [ev.StepCompleted(item.order_id, step_number, step.name, version)]
            return [*completed, ev.TidiedUp(item.order_id)] if step.removes_item else completed
        if step.act is not None:
            return decide(state, step.act(item), now)
        return []

    def _sync_timers(self) -> None:
        """Follow the logged deadlines on the monotonic clock.

        A deadline is taken over when it first appears: its length as the wall clock
        measures it at that moment (never more than the longest timeout or pause), from
        then on counted on the monotonic clock, so a later wall-clock jump neither fires
        it early nor holds it back."""
        state = self.state
        if state.estop:
            return  # frozen; the release moves every logged deadline, and they are taken over anew
        mono, wall = self._clock.monotonic(), self._clock.now()
        policy = state.policy
        longest = max(policy.unit_timeout_s, policy.transit_timeout_s, policy.backoff_max_s)
        touched, self._to_time = self._to_time, set()
        for order_id in touched:
            item = state.work_items.get(order_id)
            moment = None if item is None else item.paused_until or item.deadline
            if moment is None:
                self._timers.pop(order_id, None)
                continue
            known = self._timers.get(order_id)
            if known is None or known[0] != moment:
                left = min(longest, max(0.0, (parse(moment) - wall).total_seconds()))
                self._timers[order_id] = (moment, mono + left)

    def due(self) -> tuple[str, ...]:
        """The items whose timeout or retry pause has run out."""
        self._sync_timers()
        if self.state.estop:
            return ()
        now = self._clock.monotonic()
        return tuple(order_id for order_id, (_, at) in self._timers.items() if at <= now)

    def next_wake(self) -> float | None:
        """Seconds until the next timeout or retry is due (None: nothing is timed, or e-stop)."""
        self._sync_timers()
        if self.state.estop or not self._timers:
            return None
        return max(0.0, min(at for _, at in self._timers.values()) - self._clock.monotonic())
