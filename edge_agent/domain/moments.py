"""Points in time as the log writes them: ISO 8601, UTC, microseconds, a Z.

In that one format, text order is time order, so deadlines compare as strings.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache


@lru_cache(maxsize=1)  # a batch of commands formats the same moment once per command
def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def later(ts: str, seconds: float) -> str:
    """`ts` moved by `seconds` (negative: earlier)."""
    return iso(parse(ts) + timedelta(seconds=seconds))


def seconds_between(start: str, end: str) -> float:
    return (parse(end) - parse(start)).total_seconds()
