"""How the CLI shows things to people: rich tables, progress, JSON lines."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edge_agent.log.journal import Progress as ProgressCallback

# Below this many events a replay is instant: no progress bar.
PROGRESS_THRESHOLD = 20_000

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(value) + b"\n")
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


def print_state(view: dict[str, Any]) -> None:
    """The human form of a state view (see `domain.view.state_view`)."""
    lane = view["lane"]
    out.print(
        f"[bold]log position[/] {view['last_seq']}   [bold]inventory issued[/] {view['inventory_seq']}   "
        f"[bold]e-stop[/] {'[red]ENGAGED[/]' if view['estop'] else 'released'}"
    )
    stations = Table("station", "state", "order", title="Stations", title_justify="left")
    for station in view["stations"]:
        stations.add_row(station["id"], station["state"], station["order_id"] or "-")
    out.print(stations)
    queue = ", ".join(lane["queue"]) or "-"
    out.print(f"[bold]Shipping lane[/] {lane['state']}  moving: {lane['order_id'] or '-'}  queued: {queue}")
    items = Table(
        "order",
        "product",
        "qty",
        "warehouse",
        "prio",
        "stage",
        "station",
        "progress",
        "reason",
        title=f"Work items ({len(view['work_items'])})",
        title_justify="left",
    )
    for item in view["work_items"]:
        items.add_row(
            item["order_id"],
            item["product_id"],
            str(item["qty"]),
            item["warehouse"],
            str(item["priority"]),
            item["stage"],
            item["station"] or "-",
            f"{item['progress']}% ({item['units_done']}/{item['qty']})",
            item["reason"] or "",
        )
    out.print(items)
