"""Retention by itself: the agent keeps its log within `log.max_mb` / `log.keep_days`,
its WAL bounded and its archives within `log.archive_max_mb`, with nobody logged in.

A task on the agent's event loop (see `Agent.run`), not a thread: every step that
writes is a short transaction of its own on the agent's connection, run between
two of the agent's commits, so a commit waits for one step at most and never on
SQLite's lock (a second connection's writer would make it wait in the busy
handler, whose sleeps are milliseconds long). Only the archive, which reads and
compresses without writing to the log, is written on a thread, through a
connection of its own. The README has the measurements behind this.

Every `CHECK_S` it looks at the log:
- past half of `max_mb` (its pages in use), or holding events older
  than `keep_days`, it compacts (`edge_agent.log.compact`: never past the outbox
  cursor), in slices; the freed pages go back to the file system in slices too;
- idle since the last look, it empties the WAL (`wal_checkpoint(TRUNCATE)`),
  giving up at once if a reader is in the middle of a read: that reader's next
  pause lets the next try through. A reader that never lets go (an open
  transaction in an `sqlite3` shell) stops any checkpoint from starting the WAL
  over, so the WAL grows with every commit: past `WAL_WARN_BYTES` a warning
  says so, and `edge_agent_log_wal_bytes` shows it;
- with `archive_max_mb`, it removes the oldest archives until the rest fit.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from edge_agent.clock import Clock
from edge_agent.domain.moments import iso
from edge_agent.errors import EdgeAgentError
from edge_agent.log.compact import Plan, Retention, archives, plan, prune_archives, write_archive
from edge_agent.log.store import CUT_SLICE_EVENTS, EventLog

log = logging.getLogger(__name__)

CHECK_S = 1.0  # between two looks at the log
HIGH_WATER = 0.5  # of max_mb: compaction starts here, so that what comes until it is done stays under max_mb
VACUUM_PAGES = 256  # free pages given back to the file system per step (1 MB of 4 KB pages)
WAL_WARN_BYTES = 64 << 20  # a WAL this large means a reader has held the log open for a long time
MB = 1 << 20


@dataclass(frozen=True, slots=True)
class Budget:
    """What retention keeps to (config `log.*`); None: no bound."""

    retention: Retention
    max_mb: float | None = None
    keep_days: float | None = None
    archive_max_mb: float | None = None


@dataclass
class RetentionCounts:
    """What retention has done since the agent started (`/metrics`)."""

    compactions: int = 0
    events_removed: int = 0
    archives_removed: int = 0
    checkpoints: int = 0
    checkpoints_busy: int = 0  # a reader was in the middle of a read
    longest_step_s: float = 0.0  # the longest a step (slice, vacuum, checkpoint) held the event loop


class Keeper:
    """The background retention of one log; `await keeper.run()` until cancelled."""

    def __init__(
        self,
        log_: EventLog,
        budget: Budget,
        archive_dir: Path,
        clock: Clock,
        *,
        writable: Callable[[], bool] = lambda: True,
        check_s: float = CHECK_S,
        slice_events: int = CUT_SLICE_EVENTS,
    ) -> None:
        """`writable`: whether the log can be written now (not in a storage fault);
        `check_s`, `slice_events`: how often it looks, how much one step removes."""
        self._log = log_
        self._retention = budget.retention
        self._max_bytes = int(budget.max_mb * MB) if budget.max_mb is not None else None
        self._keep = timedelta(days=budget.keep_days) if budget.keep_days is not None else None
        self._archive_max = int(budget.archive_max_mb * MB) if budget.archive_max_mb is not None else None
        self.archive_dir = archive_dir
        self._clock = clock
        self._writable = writable
        self._check_s = check_s
        self._slice_events = slice_events
        self.counts = RetentionCounts()
        self._last_head = -1
        self._wal_warned = WAL_WARN_BYTES
        self._over_warned = self._max_bytes or 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            if not self._writable():
                continue  # the storage fault's own probe says when the disk is back
            try:
                await self.tend()
            except (EdgeAgentError, OSError, sqlite3.Error) as error:  # a full or failing disk: not the agent's end
                log.warning("retention: %s; tried again in %.0f s", error, self._check_s)

    async def tend(self) -> None:
        """One look at the log: compact, empty the WAL, prune the archives, as due."""
        due = self._due()
        if due is not None:
            await self._compact(due)
        self._over_budget()
        if self._archive_max is not None:
            self.counts.archives_removed += len(prune_archives(self.archive_dir, self._archive_max))
        self._bound_wal()

    def _due(self) -> Plan | None:
        base = self._log.base().seq
        up_to: int | None = base  # nothing new, but a cut that stopped half-way is finished
        if self._max_bytes is not None and self._log.used_bytes() > self._max_bytes * HIGH_WATER:
            up_to = None  # everything the broker has acknowledged
        elif self._keep is not None:
            up_to = self._log.last_seq_older_than(iso(self._clock.now() - self._keep))
        return plan(self._log, self._retention, self.archive_dir, up_to)

    async def _compact(self, due: Plan) -> None:
        started = time.monotonic()
        if due.archive is not None and not due.resumed:
            await asyncio.to_thread(_archive, self._log.path, due)
        archive = str(due.archive) if due.archive is not None else None
        removed = 0
        while self._log.base().seq < due.to_seq:
            removed += self._step(lambda: self._log.cut_slice(due.to_seq, archive, self._slice_events))
            await asyncio.sleep(0)  # a commit waiting goes first
        free = self._step(lambda: self._log.vacuum(VACUUM_PAGES))
        while free:  # a log made before incremental vacuum keeps its free pages: stop when none go
            await asyncio.sleep(0)
            before, free = free, self._step(lambda: self._log.vacuum(VACUUM_PAGES))
            if free >= before:
                break
        self.counts.compactions += 1
        self.counts.events_removed += removed
        log.info(
            "log compacted (%s): events %d to %d, %d removed%s, in %.2f s",
            self._retention,
            due.from_seq,
            due.to_seq,
            removed,
            f", archived to {due.archive}" if due.archive is not None else "",
            time.monotonic() - started,
        )

    def _step(self, step: Callable[[], int]) -> int:
        started = time.perf_counter()
        try:
            return step()
        finally:
            self.counts.longest_step_s = max(self.counts.longest_step_s, time.perf_counter() - started)

    def _over_budget(self) -> None:
        """Say so (once, and again if it doubles) when compaction cannot keep the log under
        max_mb: what is left is events the broker has not acknowledged, or the idempotency
        record of every order ever taken, which no compaction removes."""
        if self._max_bytes is None:
            return
        used = self._log.used_bytes()
        if used > self._over_warned:
            self._over_warned = used * 2
            log.warning(
                "the log holds %.1f MB after compaction, over log.max_mb (%.1f MB): %d events since the last "
                "snapshot the broker has acknowledged, and the record of every order ever taken",
                used / MB,
                self._max_bytes / MB,
                self._log.count(self._log.base().seq + 1),
            )

    def _bound_wal(self) -> None:
        head = self._log.head().seq
        idle, self._last_head = head == self._last_head, head
        _, wal = self._log.sizes()
        if idle and wal > 0:
            if self._step(lambda: int(self._log.checkpoint(wait=False))):
                self.counts.checkpoints += 1
                self._wal_warned = WAL_WARN_BYTES
                return
            self.counts.checkpoints_busy += 1
        if wal > self._wal_warned:
            self._wal_warned = wal * 2  # said again only if it doubles
            log.warning(
                "the WAL of %s is %d MB: a reader has held the log open for long (an open transaction "
                "in an sqlite3 shell?); it cannot shrink until that reader lets go",
                self._log.path,
                wal // MB,
            )

    def archive_bytes(self) -> int:
        return sum(size for _, size in archives(self.archive_dir))


def _archive(path: Path, due: Plan) -> None:
    """On a thread: the archive, read through a connection of its own."""
    with EventLog(path, readonly=True) as reader:
        write_archive(reader, due)
