"""The formats this release writes, and whether it can take over a log another release wrote.

A log records every migration applied to it and, per release that wrote to it
(table `writers`, from 0.2.0 on), the formats that release writes: each event
type's payload version, the snapshot format and the workflow version. This
release reads every older format (upcast in `domain/upcast.py`, older step lists
kept in `workflow/steps.py`); a log holding anything newer is refused before
anything in it is changed. `survey` is what `edge-agent upgrade check` reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from edge_agent import __version__
from edge_agent.domain.state import State, WorkItem
from edge_agent.domain.upcast import EVENT_VERSIONS, SNAPSHOT_FORMAT
from edge_agent.errors import EdgeAgentError, NewerLog
from edge_agent.log.identity import identify, provenance
from edge_agent.log.journal import replay
from edge_agent.log.schema import MIGRATIONS
from edge_agent.log.store import EventLog
from edge_agent.workflow.steps import WORKFLOW_VERSION, WORKFLOWS


def formats_json() -> str:
    """What this release writes, as the `writers` table records it."""
    formats = {"events": EVENT_VERSIONS, "snapshot": SNAPSHOT_FORMAT, "workflow": WORKFLOW_VERSION}
    return orjson.dumps(formats, option=orjson.OPT_SORT_KEYS).decode()


def newer_parts(migrations: frozenset[str] | set[str], writers: Mapping[str, str]) -> list[tuple[str | None, str]]:
    """What a log holds that this release does not know: (the release that wrote it, if
    known; what it is), e.g. ("0.3.0", "snapshot format 3")."""
    known = {name for name, _ in MIGRATIONS}
    found: list[tuple[str | None, str]] = []
    for release, text in sorted(writers.items()):
        formats = orjson.loads(text)
        for type_, version in sorted(formats.get("events", {}).items()):
            if type_ not in EVENT_VERSIONS:
                found.append((release, f"event type {type_}"))
            elif version > EVENT_VERSIONS[type_]:
                found.append((release, f"{type_} payload v{version}"))
        if formats.get("snapshot", 1) > SNAPSHOT_FORMAT:
            found.append((release, f"snapshot format {formats['snapshot']}"))
        if formats.get("workflow", 1) > WORKFLOW_VERSION:
            found.append((release, f"workflow v{formats['workflow']}"))
    newest = max(writers, default=__version__, key=_release_key)
    by = newest if _release_key(newest) > _release_key(__version__) else None  # else: not recorded
    found += [(by, f"migration {name}") for name in sorted(migrations - known)]
    return found


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in release.split("."))


def refusal(path: Path, parts: list[tuple[str | None, str]]) -> str:
    """One line: who wrote `path`, what of it this release does not know, and this release."""
    releases = sorted({release for release, _ in parts if release is not None}, key=_release_key)
    by = f"edge-agent {', '.join(releases)}" if releases else "a newer edge-agent"
    what = ", ".join(part for _, part in parts)
    return f"{path} was written by {by} ({what}); this is edge-agent {__version__}, which cannot read it: run {by}"


def refuse_newer(path: Path) -> None:
    """NewerLog if the existing log `path` holds a format newer than this release's. Only
    reads the file (see `identify`); a missing file is a new log, and passes."""
    if not path.exists():
        return
    identify(path)
    recorded = provenance(path)
    parts = newer_parts(recorded.migrations, recorded.writers)
    if parts:
        raise NewerLog(refusal(path, parts))


# -- upgrade check -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """What this release will do with one live work item."""

    order_id: str
    stage: str
    steps_done: int
    workflow: int | None  # the step list it follows (None: not begun; it takes this release's)
    next_step: str | None
    action: str


@dataclass(slots=True)
class Survey:
    """What `upgrade check` found in a log: whether this release can take it over, and how."""

    release: str = __version__
    releases: list[str] = field(default_factory=list)  # that wrote to the log, oldest first
    migrations_pending: list[str] = field(default_factory=list)
    snapshot_formats: dict[int, int] = field(default_factory=dict)  # format -> snapshots
    payload_versions: dict[str, dict[int, int]] = field(default_factory=dict)  # type -> version -> events
    upcasts: list[str] = field(default_factory=list)
    last_seq: int | None = None
    items: list[ItemPlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def survey(log_: EventLog) -> Survey:
    """Read the whole log (read-only) as this release would take it over."""
    found = Survey()
    writers = log_.writers()
    found.releases = sorted({*log_.releases_started(), *writers}, key=_release_key)
    recorded = set(log_.migrations())
    found.migrations_pending = [name for name, _ in MIGRATIONS if name not in recorded]
    found.snapshot_formats = log_.snapshot_formats()
    found.payload_versions = log_.payload_versions()
    parts = newer_parts(recorded, writers)
    parts += [(None, f"snapshot format {v}") for v in found.snapshot_formats if v > SNAPSHOT_FORMAT]
    for type_, versions in sorted(found.payload_versions.items()):
        if type_ not in EVENT_VERSIONS:
            parts.append((None, f"event type {type_}"))
        elif max(versions) > EVENT_VERSIONS[type_]:
            parts.append((None, f"{type_} payload v{max(versions)}"))
    if parts:
        found.problems.append(refusal(log_.path, list(dict.fromkeys(parts))))
        return found
    found.upcasts = _upcasts(found)
    try:
        state = replay(log_)
    except EdgeAgentError as error:
        found.problems.append(f"the log cannot be replayed: {error}")
        return found
    found.last_seq = state.last_seq
    found.items = [_plan(item) for item in _in_order(state)]
    found.problems += [f"order {p.order_id}: {p.action}" for p in found.items if p.next_step is None]
    return found


def _upcasts(found: Survey) -> list[str]:
    said = [
        f"{count} snapshot(s) of format {version} upcast to format {SNAPSHOT_FORMAT} when read"
        for version, count in sorted(found.snapshot_formats.items())
        if version < SNAPSHOT_FORMAT
    ]
    for type_, versions in sorted(found.payload_versions.items()):
        said += [
            f"{count} {type_} event(s) of payload v{version} upcast to v{EVENT_VERSIONS[type_]} when read"
            for version, count in sorted(versions.items())
            if version < EVENT_VERSIONS[type_]
        ]
    said += [f"migration {name} applied at start" for name in found.migrations_pending]
    return said


def _in_order(state: State) -> list[WorkItem]:
    return sorted(state.work_items.values(), key=lambda item: item.accepted_seq)


def _plan(item: WorkItem) -> ItemPlan:
    version = item.workflow if item.workflow is not None else WORKFLOW_VERSION
    steps = WORKFLOWS.get(version)
    done = len(item.steps_done)
    if steps is None:
        return ItemPlan(item.order_id, item.stage, done, item.workflow, None, f"workflow v{version} is unknown here")
    names = [step.name for step in steps]
    if list(item.steps_done) != names[:done] or done >= len(names):
        action = f"its steps {list(item.steps_done)} are not those of workflow v{version}"
        return ItemPlan(item.order_id, item.stage, done, item.workflow, None, action)
    where = f"step {done} ({names[done]}) of workflow v{version}"
    if item.workflow is None:
        action = f"starts at {where}"
    elif version < WORKFLOW_VERSION:
        action = f"finishes under its older workflow: resumes at {where} (new items follow v{WORKFLOW_VERSION})"
    else:
        action = f"resumes at {where}"
    return ItemPlan(item.order_id, item.stage, done, item.workflow, names[done], action)
