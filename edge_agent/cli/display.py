"""How the CLI shows things to people: rich tables, progress, JSON lines."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from edge_agent.domain import narrative
from edge_agent.log.journal import Progress as ProgressCallback

# Below this many events a replay is instant: no progress bar.
PROGRESS_THRESHOLD = 20_000

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# What JSON may carry raw but a terminal must not get: DEL, C1, line separators and
# bidirectional controls (JSON escapes C0 itself).
_JSON_UNPRINTABLE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """`value` as text with every control character, line separator and bidirectional
    control written as an escape (`\\x1b`, `\\u202e`): a log may hold them (an old log, a
    `--db` file from elsewhere), and raw in a terminal they move the cursor, recolour or
    retitle it, ring it, or show a value reordered."""
    return narrative.printable(str(value))


def plain(value: object) -> Text:
    """A table cell or line part from the log: escaped, and never read as rich markup."""
    return Text(printable(value))


def safe_json(line: bytes) -> bytes:
    """JSON text with DEL, C1, line separators and bidirectional controls as `\\uXXXX`
    escapes: the same value, nothing raw."""
    if line.isascii() and b"\x7f" not in line:
        return line  # nearly every line: nothing to look for
    text = _JSON_UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", line.decode())
    return text.encode()


def print_json(value: Any) -> None:
    sys.stdout.buffer.write(safe_json(orjson.dumps(value)) + b"\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: int) -> Iterator[ProgressCallback | None]:
    """A progress bar on stderr for long work (so stdout stays clean for --json)."""
    if total < PROGRESS_THRESHOLD or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def agent_line(agent: dict[str, Any], as_of: str | None, now: datetime | None = None) -> Text:
    """`running, pid N, up 3 h` or `not running; state as of <time>`: a stopped cell
    must never look as if it were building."""
    if agent["running"]:
        pid = agent["pid"] if agent["pid"] is not None else "unknown"
        up = f", up {_duration(agent['since'], now)}" if agent["since"] else ""
        return Text.assemble(("running", "bold green"), printable(f", pid {pid}{up}"))
    since = f"; state as of {printable(as_of)}" if as_of else "; no events yet"
    return Text.assemble(("not running", "bold yellow"), since)


def _duration(since: str, now: datetime | None) -> str:
    try:
        seconds = ((now or datetime.now(UTC)) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


# Short names for the stages, used when the full table would not fit the terminal.
_SHORT_STAGE = {
    "New": "new",
    "FactoryReady": "ready",
    "FactoryComplete": "built",
    "MoveToWarehouse": "shipping",
    "InventoryAvailable": "stored",
    "Failed": "failed",
    "Cancelled": "cancelled",
}


def _short_stage(item: dict[str, Any]) -> str:
    if item["stage"] == "FactoryAccepted":  # at a station or waiting for one
        return str(item["station_stage"] or "waiting").lower()
    stage = str(item["stage"])
    return _SHORT_STAGE.get(stage, stage)


# (heading, short heading, key)
_COLUMNS = (
    ("order", "order", "order_id"),
    ("product", "product", "product_id"),
    ("qty", "qty", "qty"),
    ("warehouse", "to", "warehouse"),
    ("prio", "prio", "priority"),
    ("stage", "stage", "stage"),
    ("station", "at", "station"),
    ("progress", "done", "progress"),
    ("reason", "reason", "reason"),
)
_KEPT_WHOLE = ("order_id", "product_id", "warehouse", "station")
_WHOLE_UP_TO = 12


def _items_table(items: list[dict[str, Any]], short: bool) -> Table:
    """The work items; `short`: abbreviated stages and progress, for a narrow terminal."""
    title = f"Work items ({len(items)})"
    if short:
        title += ": stages abbreviated to fit; --json has every value whole"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    longest = {key: max((len(printable(item[key] or "")) for item in items), default=0) for key in _KEPT_WHOLE}
    for heading, short_heading, key in _COLUMNS:
        # Values from the log wrap (fold) rather than end in "…", and ids up to _WHOLE_UP_TO
        # characters stay on one line: the reason column gives way first.
        whole = min(longest[key], _WHOLE_UP_TO) if key in longest else None
        table.add_column(short_heading if short else heading, overflow="fold", min_width=whole)
    for item in items:
        progress = f"{item['units_done']}/{item['qty']}"
        table.add_row(
            plain(item["order_id"]),
            plain(item["product_id"]),
            str(item["qty"]),
            plain(item["warehouse"]),
            str(item["priority"]),
            plain(_short_stage(item) if short else item["stage"]),
            plain(item["station"] or "-"),
            progress if short else f"{item['progress']}% ({progress})",
            plain(item["reason"] or ""),
        )
    return table


def print_state(view: dict[str, Any]) -> None:
    """The human form of a state view (see `domain.view.state_view`); with the agent's
    line when `view` has one (`status`). Every value from the log is escaped."""
    if "agent" in view:
        out.print(agent_line(view["agent"], view["as_of"]))
    lane = view["lane"]
    out.print(
        f"[bold]log position[/] {view['last_seq']}   [bold]inventory issued[/] {view['inventory_seq']}   "
        f"[bold]e-stop[/] {'[red]ENGAGED[/]' if view['estop'] else 'released'}"
    )
    if "outbox" in view:  # `status`: how far the broker has acknowledged the events
        outbox = view["outbox"]
        out.print(f"[bold]outbox[/] published up to seq {outbox['published_seq']}, {outbox['waiting']} waiting")
    stations = Table("station", "state", "order", title="Stations", title_justify="left", box=box.SIMPLE_HEAD)
    for station in view["stations"]:
        stations.add_row(plain(station["id"]), plain(station["state"]), plain(station["order_id"] or "-"))
    out.print(stations)
    queue = ", ".join(printable(order_id) for order_id in lane["queue"]) or "-"
    moving = printable(lane["order_id"] or "-")
    lane_text = f"{printable(lane['state'])}  moving: {moving}  queued: {queue}"
    out.print(Text.assemble(("Shipping lane ", "bold"), lane_text), soft_wrap=False)
    items = _items_table(view["work_items"], short=False)
    natural = out.measure(items, options=out.options.update_width(10_000)).maximum
    if natural > out.width:
        items = _items_table(view["work_items"], short=True)
    out.print(items)
