"""What a running agent lets the rest of the program read, and how it tells of commits.

The outbox, the service's metrics and any other consumer of a running log take
a `LogReader` (an `Agent` is one) rather than the log itself: they read rows and
the state, keep a cursor of their own, and hear of each commit as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from edge_agent.domain.state import State
from edge_agent.log.journal import CommitObserver
from edge_agent.log.store import Row


class LogReader(Protocol):
    @property
    def state(self) -> State:
        """The state as of the last commit."""
        ...

    def rows(
        self, from_seq: int = 1, to_seq: int | None = None, *, subject: str | None = None, limit: int | None = None
    ) -> Iterator[Row]:
        """Stored rows in seq order, optionally only those about `subject`."""
        ...

    def cursor(self, name: str) -> int | None:
        """How far the consumer `name` has got (None if it never said)."""
        ...

    def save_cursor(self, name: str, seq: int) -> None: ...

    def add_observer(self, observer: CommitObserver) -> None:
        """Call `observer(commit)` after every commit from now on."""
        ...

    def remove_observer(self, observer: CommitObserver) -> None: ...

    async def next_commit(self) -> State:
        """Wait for the next commit; the state it led to."""
        ...
