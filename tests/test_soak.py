"""A short simulated year (see tests.support.soak; `make soak` runs the long one): with
retention on, the log's disk stays within its budget, the process's memory, file
descriptors and threads stay flat, and the log verifies at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.soak import soak

MAX_MB = 2.0
WAL_BOUND_MB = 4.5  # SQLite checkpoints the WAL past 1000 pages (4 MB of 4 KB pages), plus one transaction


@pytest.mark.slow
def test_a_short_simulated_year_keeps_the_log_within_its_budget_and_the_process_flat(tmp_path: Path) -> None:
    run = soak(tmp_path, orders=2400, retention="archive", max_mb=MAX_MB)
    figures = run.summary()
    assert figures["verify"] == "ok"
    assert run.compactions >= 2
    assert run.base_seq > 0
    assert run.events_removed == run.base_seq  # every event before the base went, into an archive
    # The events' part of the file (the idempotency record grows with every order: README).
    # At the soak's pace, some 20,000 times a real cell's, what arrives while a compaction
    # is due (a look every second, the outbox's acknowledgements saved every second) adds
    # up to half of the budget again; at a real cell's, nothing measurable.
    assert all(s.db_bytes - s.record_bytes <= 1.5 * MAX_MB * (1 << 20) for s in run.samples), figures
    assert all(s.wal_bytes <= WAL_BOUND_MB * (1 << 20) for s in run.samples), figures
    assert all(s.archive_bytes <= 2 * MAX_MB * (1 << 20) for s in run.samples), figures
    steady = run.samples[len(run.samples) // 3 :]
    assert len(steady) >= 3
    assert steady[-1].rss_mb - steady[0].rss_mb < 5, figures
    # The archive's thread reads through a connection of its own (the file, its WAL and -shm)
    # while it writes: a sample may meet it open.
    assert max(s.fds for s in steady) - min(s.fds for s in steady) <= 3, figures
    assert len({s.threads for s in steady}) == 1, figures
