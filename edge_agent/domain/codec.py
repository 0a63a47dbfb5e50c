"""Events and state to and from JSON-ready dicts (pure; the log stores the text).

Field names become JSON keys unchanged: they are part of the log format and of
the MQTT `events` payload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from immutables import Map

from edge_agent.domain import events as ev
from edge_agent.domain.state import Lane, Policy, Stage, State, Station, StationStage, WorkItem
from edge_agent.errors import InvalidEvent

_ENCODER = msgspec.json.Encoder()
_DECODERS = {name: msgspec.json.Decoder(cls) for name, cls in ev.EVENT_TYPES.items()}


def records_from_rows(rows: list[tuple[int, str, str, str]]) -> list[ev.Recorded]:
    """Stored (seq, ts, type, data) rows as recorded events: a replay's inner loop, hence
    one comprehension; a row that does not decode is named by `event_from_json`."""
    try:
        return [ev.Recorded(seq, ts, _DECODERS[type_].decode(data)) for seq, ts, type_, data in rows]
    except (KeyError, msgspec.DecodeError):
        return [ev.Recorded(seq, ts, event_from_json(type_, data, seq)) for seq, ts, type_, data in rows]


def events_to_json(events: Sequence[ev.Event]) -> list[str]:
    """Each event's fields as a JSON object, in the order they are declared; encoded in
    one call (JSON escapes every newline inside a string, so the lines split exactly at
    the events)."""
    return _ENCODER.encode_lines(events).decode().split("\n")[: len(events)]


def event_from_json(type_name: str, data: str | bytes, seq: int = 0) -> ev.Event:
    """The event of type `type_name` that `data` holds (InvalidEvent if it holds none)."""
    decoder = _DECODERS.get(type_name)
    if decoder is None:
        raise InvalidEvent(seq, f"unknown event type {type_name!r}")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as error:  # also a ValidationError: wrong, missing or unexpected fields
        raise InvalidEvent(seq, f"{type_name} has unexpected data ({error})") from error


def state_to_dict(state: State) -> dict[str, Any]:
    """The whole state, losslessly (what a snapshot stores)."""
    return {
        "last_seq": state.last_seq,
        "last_ts": state.last_ts,
        "estop": state.estop,
        "inventory_seq": state.inventory_seq,
        "estop_since": state.estop_since,
        "stations": [[s.id, s.order_id] for s in state.stations],
        "products": dict(state.products.items()),
        "policy": msgspec.structs.asdict(state.policy),
        "lane": {"order_id": state.lane.order_id, "queue": list(state.lane.queue)},
        "work_items": [msgspec.structs.astuple(item) for item in state.work_items.values()],
        "accepted": state.accepted,
        "rejected": state.rejected,
    }


def state_from_dict(data: dict[str, Any]) -> State:
    names = WorkItem.__struct_fields__
    items = {}
    for row in data["work_items"]:
        values = dict(zip(names, row, strict=True))
        values["stage"] = Stage(values["stage"])
        if values["station_stage"] is not None:
            values["station_stage"] = StationStage(values["station_stage"])
        values["steps_done"] = tuple(values["steps_done"])
        items[values["order_id"]] = WorkItem(**values)
    return State(
        last_seq=data["last_seq"],
        last_ts=data["last_ts"],
        estop=data["estop"],
        inventory_seq=data["inventory_seq"],
        estop_since=data["estop_since"],
        stations=tuple(Station(sid, oid) for sid, oid in data["stations"]),
        products=Map(data["products"]),
        policy=msgspec.convert(data["policy"], Policy),  # an older `on_fault` key is ignored
        lane=Lane(data["lane"]["order_id"], tuple(data["lane"]["queue"])),
        work_items=Map(items),
        accepted=_accepted(data),
        rejected=data["rejected"],
    )


def _accepted(data: dict[str, Any]) -> int:
    """Orders accepted ever. A snapshot written before the idempotency record moved out
    of the state holds every accepted order's id instead (its `orders` map): their count."""
    if "accepted" in data:
        return int(data["accepted"])
    return len(data["orders"])
