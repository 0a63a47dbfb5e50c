"""Points in time as the log writes them: ISO 8601, UTC, microseconds, a Z.

In that one format, text order is time order, so deadlines compare as strings.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_last_iso: tuple[datetime | None, str] = (None, "")


def iso(moment: datetime) -> str:
    # A batch formats the same moment once per command: remember the last one (one
    # tuple, so a reader on another thread sees a matching pair).
    global _last_iso
    last, text = _last_iso
    if moment is not last:
        text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        _last_iso = (moment, text)
    return text


def parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def later(ts: str, seconds: float) -> str:
    """`ts` moved by `seconds` (negative: earlier)."""
    return iso(parse(ts) + timedelta(seconds=seconds))


def seconds_between(start: str, end: str) -> float:
    return (parse(end) - parse(start)).total_seconds()
