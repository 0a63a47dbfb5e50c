"""Runs every work item's workflow against the journal: resume, advance, time out.

Synchronous on purpose: the agent's event loop calls `execute` for each input
and request, then `advance` until nothing is left to do, and sleeps until
`next_wake`. Every decision goes through `decide` and is committed before it
has any effect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from edge_agent.clock import Clock
from edge_agent.domain import commands as cmd
from edge_agent.domain import events as ev
from edge_agent.domain.decide import decide
from edge_agent.domain.events import Recorded
from edge_agent.domain.evolve import fold
from edge_agent.domain.moments import iso, parse
from edge_agent.domain.state import Stage, State, WorkItem
from edge_agent.errors import CommandRejected, EdgeAgentError
from edge_agent.workflow.steps import STEP_NAMES, STEPS

log = logging.getLogger(__name__)

_ENDED = frozenset({Stage.FAILED, Stage.CANCELLED})
_MAX_PASSES = 10_000  # a safety net: each pass commits progress, so this is never reached


class WorkflowMismatch(EdgeAgentError):
    """The log records workflow steps that this version of the code does not have."""


class Ledger(Protocol):
    """Where decisions are committed: the log's journal (kept abstract so the layers stay apart)."""

    @property
    def state(self) -> State: ...

    def append(self, events: Sequence[ev.Event]) -> list[Recorded]: ...


class Workflow:
    def __init__(self, journal: Ledger, clock: Clock) -> None:
        self.journal = journal
        self._clock = clock

    @property
    def state(self) -> State:
        return self.journal.state

    def check(self) -> None:
        """Refuse to resume items whose recorded steps differ from the code's steps."""
        for item in self.state.work_items.values():
            for number, (recorded, expected) in enumerate(zip(item.steps_done, STEP_NAMES, strict=False)):
                if recorded != expected:
                    raise WorkflowMismatch(
                        f"order {item.order_id}: step {number} is recorded as {recorded!r} but this agent's "
                        f"step {number} is {expected!r}; the log was written by another workflow version"
                    )
            if len(item.steps_done) > len(STEP_NAMES):
                raise WorkflowMismatch(f"order {item.order_id}: more steps recorded than this agent's workflow has")

    def execute(self, command: cmd.Command) -> list[Recorded]:
        """Decide `command` now and commit the result (CommandRejected if it does not apply)."""
        return self.journal.append(decide(self.state, command, self._clock.now()))

    def execute_batch(self, commands: Sequence[cmd.Command]) -> list[Recorded]:
        """Decide each command in turn, each seeing the ones before it, and commit them all
        in one transaction (a group commit). A rejected command adds nothing."""
        now = self._clock.now()
        state = self.state
        events: list[ev.Event] = []
        for command in commands:
            try:
                decided = decide(state, command, now)
            except CommandRejected as error:
                log.warning("%s refused: %s", type(command).__name__, error)
                continue
            # What the batch so far leads to, so that the next command sees it (seqs as they will be).
            state = fold(state, [Recorded(state.last_seq + i, iso(now), e) for i, e in enumerate(decided, 1)])
            events += decided
        return self.journal.append(events)

    def advance(self) -> None:
        """Move every item and the cell forward until nothing more can happen now."""
        for _ in range(_MAX_PASSES):
            now = self._clock.now()
            state = self.state
            events: list[ev.Event] = []
            for item in state.work_items.values():
                events += self._step(state, item, now)
            if not events:  # the cell's own moves, once every item has caught up
                events = decide(state, cmd.AssignStations(), now) or decide(state, cmd.StartShipment(), now)
            if not events:
                return
            self.journal.append(events)

    def _step(self, state: State, item: WorkItem, now: datetime) -> list[ev.Event]:
        if item.stage in _ENDED:  # failed or cancelled: the workflow ends; only the tidy-up is left
            return decide(state, cmd.TidyUp(item.order_id), now)
        step_number = len(item.steps_done)
        step = STEPS[step_number]
        if step.done(item):
            completed: list[ev.Event] = [ev.StepCompleted(item.order_id, step_number, step.name)]
            return [*completed, ev.TidiedUp(item.order_id)] if step.removes_item else completed
        if step.act is not None:
            return decide(state, step.act(item), now)
        return []

    def next_wake(self) -> float | None:
        """Seconds until the next timeout or retry is due (None: nothing is timed, or e-stop)."""
        state = self.state
        if state.estop:
            return None  # timers are frozen
        due = [
            moment
            for item in state.work_items.values()
            for moment in (item.deadline, item.paused_until)
            if moment is not None
        ]
        if not due:
            return None
        return max(0.0, (parse(min(due)) - self._clock.now()).total_seconds())
