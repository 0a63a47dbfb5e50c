"""The log and the state it folds to, kept in step: commit first, then apply.

`Journal.append` writes events (and, every `snapshot_every` events, a snapshot
of the state they lead to) in one transaction; only once that has committed
does the in-memory state move on. Start-up is the newest intact snapshot plus
the events after it, with the hash chain of that tail checked on the way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.clock import Clock
from edge_agent.domain.events import Event, Recorded
from edge_agent.domain.evolve import fold
from edge_agent.domain.narrative import describe
from edge_agent.domain.state import State
from edge_agent.errors import LogCorrupted, LogError
from edge_agent.log.store import EventLog, Row, Synchronous

log = logging.getLogger(__name__)
_FOLD_BATCH = 10_000

Progress = Callable[[int], None]  # called with the number of events just folded


@dataclass(frozen=True, slots=True)
class Commit:
    """What one committed transaction did: told to every commit observer."""

    records: Sequence[Recorded]  # the events, in seq order
    state: State  # the state they lead to
    seconds: float  # how long the transaction took


CommitObserver = Callable[[Commit], None]


def checked(rows: Iterable[Row], prev_seq: int, prev_hash: str) -> Iterable[Row]:
    """The rows, as long as they continue the chain from (`prev_seq`, `prev_hash`)."""
    for row in rows:
        if row.seq != prev_seq + 1:
            raise LogCorrupted(prev_seq + 1, f"event missing (next stored is {row.seq})")
        if row.expected_hash(prev_hash) != row.hash:
            raise LogCorrupted(row.seq, "hash does not match the event or the chain (edited or reordered)")
        prev_seq, prev_hash = row.seq, row.hash
        yield row


def replay(
    log_: EventLog,
    to_seq: int | None = None,
    *,
    until: str | None = None,
    verify: bool = True,
    progress: Progress | None = None,
) -> State:
    """The state after event `to_seq` (or the last event at or before `until`),
    from the newest usable snapshot plus the events after it."""
    if until is not None:
        last_in_time = log_.last_seq_until(until)
        to_seq = last_in_time if to_seq is None else min(to_seq, last_in_time)
    base = log_.base()
    if to_seq is not None and to_seq < base.seq:
        raise LogError(f"events up to seq {base.seq} were compacted away; replay from {base.seq} on")
    snapshot = log_.latest_snapshot(to_seq)
    if snapshot is not None:
        state, prev_hash = snapshot.state, snapshot.event_hash
    else:
        if base.seq:
            raise LogCorrupted(base.seq, "the log was compacted but its snapshot is missing or damaged")
        state, prev_hash = State(), base.hash
    records: Iterable[Recorded]
    if verify:
        records = (row.decode() for row in checked(log_.rows(state.last_seq + 1, to_seq), state.last_seq, prev_hash))
    else:
        records = log_.read(state.last_seq + 1, to_seq)
    batch: list[Recorded] = []
    for record in records:
        batch.append(record)
        if len(batch) == _FOLD_BATCH:
            state = fold(state, batch)
            if progress:
                progress(len(batch))
            batch = []
    state = fold(state, batch)
    if progress and batch:
        progress(len(batch))
    return state


class Journal:
    """The agent's single writer: appends events and holds the state they fold to."""

    def __init__(self, log_: EventLog, state: State, snapshot_every: int) -> None:
        self.log = log_
        self._state = state
        self._snapshot_every = snapshot_every
        self._snapshot_seq = max([log_.base().seq, *log_.snapshot_seqs()])
        self._observers: list[CommitObserver] = []

    def add_observer(self, observer: CommitObserver) -> None:
        """Call `observer(commit)` after every commit, in the order they were added
        (outputs, the outbox, waiters, metrics). It runs on the writer's thread, before
        `append` returns: it must be quick and must not raise."""
        self._observers.append(observer)

    def remove_observer(self, observer: CommitObserver) -> None:
        self._observers.remove(observer)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "full",
        snapshot_every: int = 1000,
        clock: Clock | None = None,
    ) -> Journal:
        """Open (or create) the log at `path` and recover the state from it. An existing log
        is replayed read-only first: one that is damaged, or holds a shape of a newer release,
        is refused before anything (a migration, a writer's record) changes it. The state is
        that replay's: opening for writing adds tables, never events."""
        state: State | None = None
        if path.exists():
            try:
                with EventLog(path, readonly=True, clock=clock) as reader:
                    state = replay(reader)
            except sqlite3.Error as error:  # the file could not be read (a failing or full disk)
                raise LogError(f"cannot open the log {path}: {error}") from error
        log_ = EventLog(path, synchronous=synchronous, clock=clock)
        try:
            if state is None or log_.head().seq != state.last_seq:
                state = replay(log_)
        except BaseException:
            log_.close()
            raise
        log.info("log %s recovered at seq %d", path, state.last_seq)
        return cls(log_, state, snapshot_every)

    @property
    def state(self) -> State:
        return self._state

    def known_orders(self, order_ids: Iterable[str]) -> Mapping[str, str]:
        """The digest recorded for each of `order_ids` ever accepted (the idempotency record)."""
        return self.log.known_orders(order_ids)

    def append(self, events: Sequence[Event]) -> list[Recorded]:
        """Commit `events` as one transaction, then apply them to the state."""
        if not events:
            return []
        started = time.perf_counter()
        with self.log.transaction() as tx:
            records = tx.append(events)
            state = fold(self._state, records)
            snapshot = self._snapshot_due(state)
            if snapshot:
                tx.save_snapshot(state)
        seconds = time.perf_counter() - started
        if snapshot:
            self._snapshot_seq = state.last_seq
        self._state = state
        if log.isEnabledFor(logging.INFO):  # checked once: a burst of orders makes thousands of events
            for record in records:
                line = describe(record.event)
                if line is not None:
                    log.info("%s", line)
        commit = Commit(records, state, seconds)
        for observer in tuple(self._observers):  # one may remove itself
            observer(commit)
        return records

    def _snapshot_due(self, state: State) -> bool:
        """Every `snapshot_every` events, or, while more items than that are live, every
        as many events as there are live items: a snapshot costs in proportion to the
        live items, so this keeps its cost per event flat however long the queue is (and
        start-up, which reads the snapshot anyway, in proportion to the state)."""
        return state.last_seq - self._snapshot_seq >= max(self._snapshot_every, len(state.work_items))

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
