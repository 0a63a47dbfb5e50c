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
from edge_agent.domain.state import Lane, Policy, State, Station, WorkItem
from edge_agent.domain.upcast import SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_KEY, upcast_event, upcast_snapshot
from edge_agent.errors import InvalidEvent, NewerLog

_ENCODER = msgspec.json.Encoder()


class _NoVersion(msgspec.Struct, frozen=True, tag_field=ev.PAYLOAD_VERSION, tag=0):
    """Never stored. A versioned type is decoded as a union with this, because msgspec
    requires the tag in a union but not on a lone tagged struct: a row of an older
    version (no `_v`) or a newer one then fails the fast decoder and is upcast."""


def _decoder(cls: type[ev.Event]) -> msgspec.json.Decoder[Any]:
    if ev.payload_version(cls) == 1:
        return msgspec.json.Decoder(cls)
    return msgspec.json.Decoder(cls | _NoVersion)


_DECODERS = {name: _decoder(cls) for name, cls in ev.EVENT_TYPES.items()}


def records_from_rows(rows: list[tuple[int, str, str, str]]) -> list[ev.Recorded]:
    """Stored (seq, ts, type, data) rows as recorded events: a replay's inner loop, hence
    one comprehension over rows of the current versions; a batch with an older row (or
    one that does not decode: `event_from_json` names it) is taken row by row."""
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
        raise InvalidEvent(seq, f"unknown event type {type_name!r} (a newer release's, or not a log's)")
    try:
        event: ev.Event = decoder.decode(data)
        return event
    except msgspec.DecodeError:
        pass  # an older payload version, or a broken one
    try:
        fields = msgspec.json.decode(data)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        upcast: ev.Event = msgspec.convert(upcast_event(type_name, fields), ev.EVENT_TYPES[type_name])
        return upcast
    except NewerLog as error:
        raise NewerLog(f"event {seq}: {error}") from error
    except (msgspec.DecodeError, ValueError) as error:  # also a ValidationError: wrong, missing or unexpected fields
        raise InvalidEvent(seq, f"{type_name} has unexpected data ({error})") from error


def state_to_dict(state: State) -> dict[str, Any]:
    """The whole state, losslessly (what a snapshot stores), in the current snapshot format:
    items as rows under their field names, `item_fields` (by name, not by the code's field
    order, so a field added later is upcast, not misread)."""
    return {
        SNAPSHOT_FORMAT_KEY: SNAPSHOT_FORMAT,
        "last_seq": state.last_seq,
        "last_ts": state.last_ts,
        "estop": state.estop,
        "inventory_seq": state.inventory_seq,
        "estop_since": state.estop_since,
        "stations": [[s.id, s.order_id] for s in state.stations],
        "products": dict(state.products.items()),
        "policy": msgspec.structs.asdict(state.policy),
        "lane": {"order_id": state.lane.order_id, "queue": list(state.lane.queue)},
        "item_fields": list(WorkItem.__struct_fields__),
        "work_items": [msgspec.structs.astuple(item) for item in state.work_items.values()],
        "accepted": state.accepted,
        "rejected": state.rejected,
    }


def state_from_dict(data: dict[str, Any]) -> State:
    """The state a snapshot of any format holds (older formats upcast first)."""
    data = upcast_snapshot(data)
    fields = data["item_fields"]
    items = {}
    for row in data["work_items"]:
        item = msgspec.convert(dict(zip(fields, row, strict=True)), WorkItem)
        items[item.order_id] = item
    return State(
        last_seq=data["last_seq"],
        last_ts=data["last_ts"],
        estop=data["estop"],
        inventory_seq=data["inventory_seq"],
        estop_since=data["estop_since"],
        stations=tuple(Station(sid, oid) for sid, oid in data["stations"]),
        products=Map(data["products"]),
        policy=msgspec.convert(data["policy"], Policy),
        lane=Lane(data["lane"]["order_id"], tuple(data["lane"]["queue"])),
        work_items=Map(items),
        accepted=data["accepted"],
        rejected=data["rejected"],
    )
