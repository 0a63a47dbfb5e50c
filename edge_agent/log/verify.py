"""`log verify`: seq continuity, the hash chain, and every snapshot == replay."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.domain.codec import state_to_dict
from edge_agent.domain.evolve import fold
from edge_agent.domain.state import State
from edge_agent.errors import EdgeAgentError, LogCorrupted
from edge_agent.log.journal import Progress, checked
from edge_agent.log.store import EventLog

_FOLD_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `verify` found: `fault` is None when the log is intact."""

    first_seq: int
    last_seq: int
    events: int
    snapshots: int
    fault: LogCorrupted | None


def verify(log_: EventLog, progress: Progress | None = None) -> Verdict:
    """Check the whole stored log; stops at the first fault."""
    base = log_.base()
    snapshot_seqs = log_.snapshot_seqs()
    state = State()
    if base.seq:  # compacted: the state at the base is the snapshot kept there
        try:
            state = log_.snapshot(base.seq).state
        except EdgeAgentError as error:
            return Verdict(base.seq + 1, base.seq, 0, 0, LogCorrupted(base.seq, f"base snapshot unusable: {error}"))
    pending = [seq for seq in snapshot_seqs if seq > base.seq]
    events = checked_snapshots = 0
    batch = []
    try:
        for row in checked(log_.rows(base.seq + 1), base.seq, base.hash):
            batch.append(row.decode())
            events += 1
            if pending and row.seq == pending[0]:
                state = fold(state, batch)
                batch = []
                _compare(log_, state, row.hash)
                checked_snapshots += 1
                pending.pop(0)
            elif len(batch) == _FOLD_BATCH:
                state = fold(state, batch)
                batch = []
            if progress and events % _FOLD_BATCH == 0:
                progress(_FOLD_BATCH)
        state = fold(state, batch)
        if pending:
            raise LogCorrupted(pending[0], "snapshot beyond the last event")
    except LogCorrupted as fault:
        return Verdict(base.seq + 1, base.seq + events, events, checked_snapshots, fault)
    except EdgeAgentError as error:  # an event that does not decode or fit the state
        seq = getattr(error, "seq", base.seq + events)
        return Verdict(base.seq + 1, base.seq + events, events, checked_snapshots, LogCorrupted(seq, str(error)))
    return Verdict(base.seq + 1, state.last_seq, events, checked_snapshots + (1 if base.seq else 0), None)


def _compare(log_: EventLog, replayed: State, event_hash: str) -> None:
    snapshot = log_.snapshot(replayed.last_seq)
    if snapshot.event_hash != event_hash:
        raise LogCorrupted(snapshot.seq, "snapshot is chained to another event")
    if state_to_dict(snapshot.state) != state_to_dict(replayed):
        raise LogCorrupted(snapshot.seq, "snapshot differs from the replayed state")
