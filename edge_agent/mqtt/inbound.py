"""Inbound payloads to commands: size, then UTF-8, then JSON, then strict validation.

Every payload becomes either a `SubmitOrder` or a `RejectOrder` with a reason a
person can act on; nothing raises. Validation is strict: `"3"` is not `3`,
`true` is not `1`, unknown fields and a key given twice are rejected, no string
holds a control character, a line separator or a bidirectional control, and the
product must be one the device profile makes, in a quantity it allows.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from edge_agent.domain import commands as cmd
from edge_agent.domain.narrative import UNPRINTABLE

ORDER_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_ORDER_ID = re.compile(ORDER_ID_PATTERN)
MAX_PRIORITY = 1_000_000
MAX_QTY = 2**63 - 1  # the largest integer SQLite stores
# An integer beyond 64 bits comes out of orjson as a float; its field is strict, so the
# error is a float's ("a valid integer") unless it is told as what it is.
_BOUNDS = {"qty": (1, MAX_QTY), "priority": (-MAX_PRIORITY, MAX_PRIORITY)}


def _unprintable(value: str) -> str | None:
    """Why `value` must not be taken (a character `narrative.UNPRINTABLE` names), if so.

    They would move a terminal's cursor, ring its bell, break a line or reorder the text
    wherever the string is shown (the CLI, the journal, a back-office screen)."""
    found = UNPRINTABLE.search(value)  # one regex scan: the hot path of every order
    if found is None:
        return None
    code = ord(found.group())
    if code in (0x2028, 0x2029):
        kind = "a line or paragraph separator"
    elif code > 0xFF:
        kind = "a bidirectional control"
    else:
        kind = "a control character"
    return f"must not contain {kind} (U+{code:04X} at {found.start()})"


def _no_control(value: str) -> str:
    problem = _unprintable(value)
    if problem is not None:
        raise PydanticCustomError("control_character", problem)
    # Some character a person can see (not only spaces, NBSP or zero-width ones): a name
    # that shows as nothing on every screen names nothing. Usually decided by the first.
    if not any(not c.isspace() and unicodedata.category(c) != "Cf" for c in value):
        raise PydanticCustomError("blank", "must show a visible character")
    return value


Text = Annotated[str, AfterValidator(_no_control)]


class OrderPayload(BaseModel):
    """The JSON body of an order, as the README's "MQTT contract" gives it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    order_id: str = Field(pattern=ORDER_ID_PATTERN)
    product_id: Text = Field(min_length=1, max_length=64)
    qty: int = Field(ge=1, le=MAX_QTY)
    warehouse: Text = Field(min_length=1, max_length=64)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)


class CancelPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    order_id: str = Field(pattern=ORDER_ID_PATTERN)


def digest(order: OrderPayload) -> str:
    """The same order, however its JSON was laid out, has the same digest."""
    return cmd.order_digest(order.order_id, order.product_id, order.qty, order.warehouse, order.priority)


def parse_json(payload: bytes, max_bytes: int) -> tuple[Any, str | None]:
    """(value, None), or (None, the reason it is not acceptable JSON).

    An object with a key given twice is not acceptable either, but what else it says is
    readable: (the object without that key, whose value is in doubt, the reason)."""
    if len(payload) > max_bytes:
        return None, f"payload of {len(payload)} bytes is over the limit of {max_bytes}"
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"payload is not UTF-8 (byte {error.start})"
    try:
        value = orjson.loads(payload)  # orjson refuses nesting deeper than 1024 levels
    except orjson.JSONDecodeError as error:
        # The parser's own words ("invalid literal, expected 'null'") help nobody who sent
        # something that is not JSON at all; only these few say something a sender can act on.
        return None, _NOT_JSON.get(error.msg, "payload is not JSON")
    if isinstance(value, dict):
        twice = _key_twice(payload, value)
        if twice is not None:
            del value[twice]
            return value, f"payload has the key '{_shown(twice)}' twice"
    return value, None


_NOT_JSON = {
    "Input is a zero-length, empty document": "payload is empty, not JSON",
    "depth limit exceeded": "payload is not JSON: nested deeper than 1024 levels",
    "unexpected control character in string": "payload is not JSON: a control character in a string",
}
# The end of a key: every key of every object in the text matches, and so may a string
# value that ends in a colon. No more matches than top-level keys: no key came twice.
_KEY_END = re.compile(rb'"\s*:')


def _key_twice(payload: bytes, value: dict[str, Any]) -> str | None:
    """A key the payload gives twice in one object (orjson silently keeps the last), if any.

    Orders are flat: counting key ends is enough for them (well under a microsecond);
    only a payload with more of them than keys is parsed again, by `json`, to find out."""
    if len(_KEY_END.findall(payload)) <= len(value):
        return None
    seen: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        if len(set(keys)) < len(keys):
            seen.append(next(key for n, key in enumerate(keys) if key in keys[:n]))
        return dict(items)

    try:
        json.loads(payload, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None  # what orjson took and json cannot (huge numbers, deep nesting) fails validation anyway
    return seen[0] if seen else None


def order_command(payload: bytes, products: Mapping[str, int], max_bytes: int) -> cmd.SubmitOrder | cmd.RejectOrder:
    """The command for an inbound order payload; `products` maps product ids to their largest qty."""
    value, problem = parse_json(payload, max_bytes)
    order_id = _readable_order_id(value)
    if problem is not None:
        return cmd.RejectOrder(order_id, problem)
    if not isinstance(value, dict):
        return cmd.RejectOrder(None, _not_an_object(value))
    try:
        order = OrderPayload.model_validate(value)
    except ValidationError as error:
        return cmd.RejectOrder(order_id, describe(error))
    max_qty = products.get(order.product_id)
    if max_qty is None:
        return cmd.RejectOrder(order.order_id, f"unknown product {order.product_id!r}")
    if order.qty > max_qty:
        return cmd.RejectOrder(order.order_id, f"qty {order.qty} is over the largest {max_qty} for {order.product_id}")
    return cmd.SubmitOrder(order.order_id, order.product_id, order.qty, order.warehouse, order.priority, digest(order))


class CancelRefused(NamedTuple):
    """A cancel payload that is not one: the order it names, if readable, and why."""

    order_id: str | None
    reason: str


def cancel_command(payload: bytes, max_bytes: int) -> cmd.CancelOrder | CancelRefused:
    """The cancel command, or why the payload is not one."""
    value, problem = parse_json(payload, max_bytes)
    if problem is not None:
        return CancelRefused(_readable_order_id(value), problem)
    if not isinstance(value, dict):
        return CancelRefused(None, _not_an_object(value))
    try:
        return cmd.CancelOrder(CancelPayload.model_validate(value).order_id)
    except ValidationError as error:
        return CancelRefused(_readable_order_id(value), describe(error))


def _not_an_object(value: Any) -> str:
    """The reason a JSON value that is not an object is no order, in JSON's own terms."""
    match value:
        case None:
            return "payload is JSON null, not an object"
        case bool():
            return "payload is a JSON boolean, not an object"
        case int() | float():
            return "payload is a JSON number, not an object"
        case str():
            return "payload is a JSON string, not an object"
        case _:
            return "payload is a JSON array, not an object"


MAX_PROBLEMS = 5  # named in a rejection; the rest are counted
_FIELD_SHOWN = 40  # characters of a field name the sender chose


def describe(error: ValidationError) -> str:
    """The field problems on one short line: `qty: Input should be a valid integer; ...`.

    The reason is logged, published and written to the service log, so it must not grow
    with the payload nor carry the sender's line breaks: field names are shown escaped and
    cut short, and only the first few problems are named."""
    problems = []
    errors = error.errors(include_url=False)
    for item in errors[:MAX_PROBLEMS]:
        name = ".".join(str(part) for part in item["loc"])
        problems.append(f"{_shown(name or 'payload')}: {_message(name, item)}")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(problems)


def _message(name: str, item: ErrorDetails) -> str:
    """Pydantic's message, but where it would hide what is wrong (never the input itself)."""
    kind, given = item["type"], item.get("input")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "string_pattern_mismatch" and isinstance(given, str):
        return _unprintable(given) or item["msg"]  # the character, not a pattern that cannot say why
    bounds = _BOUNDS.get(name)
    if kind == "int_type" and bounds and isinstance(given, float) and given.is_integer() and abs(given) >= 2**63:
        return f"out of range (from {bounds[0]} to {bounds[1]})"
    return item["msg"]


def _shown(name: str) -> str:
    """A name the sender chose, escaped and cut short enough for one line of a log."""
    name = name.encode("unicode_escape").decode("ascii")
    return name[:_FIELD_SHOWN] + "..." if len(name) > _FIELD_SHOWN else name


def _readable_order_id(value: Any) -> str | None:
    """The order id to name in a rejection, if the payload has a well-formed one."""
    order_id = value.get("order_id") if isinstance(value, dict) else None
    return order_id if isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id) else None
