"""A compactor for the crash test of retention: archives, then cuts the log one snapshot
at a time, waiting for a line on stdin between two slices, so the test can kill it there.

Run as `python -m tests.support.crash_compactor PATH` from the project root. It prints
`planned FROM TO`, then `base SEQ` (flushed) once each slice has committed, and `done`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_agent.log.compact import Retention, plan, write_archive
from edge_agent.log.store import EventLog


def main() -> None:
    path = Path(sys.argv[1])
    with EventLog(path) as log_:
        planned = plan(log_, Retention.archive, path.parent / "archive")
        assert planned is not None, "nothing to compact"
        write_archive(log_, planned)
        print(f"planned {planned.from_seq} {planned.to_seq}", flush=True)
        while log_.base().seq < planned.to_seq:
            log_.cut_slice(planned.to_seq, str(planned.archive), max_events=1)
            print(f"base {log_.base().seq}", flush=True)
            sys.stdin.readline()
        print("done", flush=True)


if __name__ == "__main__":
    main()
