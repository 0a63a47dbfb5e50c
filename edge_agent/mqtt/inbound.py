"""Inbound payloads to commands: size, then UTF-8, then JSON, then strict validation.

Every payload becomes either a `SubmitOrder` or a `RejectOrder` with a reason a
person can act on; nothing raises. Validation is strict: `"3"` is not `3`,
`true` is not `1`, unknown fields are rejected, and the product must be one the
device profile makes, in a quantity it allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.domain import commands as cmd

ORDER_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
_ORDER_ID = re.compile(ORDER_ID_PATTERN)


class OrderPayload(BaseModel):
    """The JSON body of an order (SPEC §3)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    order_id: str = Field(pattern=ORDER_ID_PATTERN)
    product_id: str = Field(min_length=1, max_length=64)
    qty: int = Field(ge=1)
    warehouse: str = Field(min_length=1, max_length=64)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)


class CancelPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    order_id: str = Field(pattern=ORDER_ID_PATTERN)


def digest(order: OrderPayload) -> str:
    """The same order, however its JSON was laid out, has the same digest."""
    return cmd.order_digest(order.order_id, order.product_id, order.qty, order.warehouse, order.priority)


def parse_json(payload: bytes, max_bytes: int) -> tuple[Any, str | None]:
    """(value, None), or (None, the reason it is not acceptable JSON)."""
    if len(payload) > max_bytes:
        return None, f"payload of {len(payload)} bytes is over the limit of {max_bytes}"
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"payload is not UTF-8 (byte {error.start})"
    try:
        return orjson.loads(payload), None  # orjson refuses nesting deeper than 1024 levels
    except orjson.JSONDecodeError as error:
        return None, f"payload is not JSON: {error.msg}"


def order_command(payload: bytes, products: Mapping[str, int], max_bytes: int) -> cmd.SubmitOrder | cmd.RejectOrder:
    """The command for an inbound order payload; `products` maps product ids to their largest qty."""
    value, problem = parse_json(payload, max_bytes)
    if problem is not None:
        return cmd.RejectOrder(None, problem)
    order_id = _readable_order_id(value)
    if not isinstance(value, dict):
        return cmd.RejectOrder(None, f"payload is a JSON {type(value).__name__}, not an object")
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


def cancel_command(payload: bytes, max_bytes: int) -> cmd.CancelOrder | str:
    """The cancel command, or the reason the payload is not one."""
    value, problem = parse_json(payload, max_bytes)
    if problem is not None:
        return problem
    try:
        return cmd.CancelOrder(CancelPayload.model_validate(value).order_id)
    except ValidationError as error:
        return describe(error)


MAX_PROBLEMS = 5  # named in a rejection; the rest are counted
_FIELD_SHOWN = 40  # characters of a field name the sender chose


def describe(error: ValidationError) -> str:
    """The field problems on one short line: `qty: Input should be a valid integer; ...`.

    The reason is logged, published and written to the service log, so it must not grow
    with the payload nor carry the sender's line breaks: field names are shown escaped and
    cut short, and only the first few problems are named."""
    problems = []
    errors = error.errors(include_url=False, include_input=False)
    for item in errors[:MAX_PROBLEMS]:
        field = ".".join(str(part) for part in item["loc"]) or "payload"
        field = field.encode("unicode_escape").decode("ascii")
        if len(field) > _FIELD_SHOWN:
            field = field[:_FIELD_SHOWN] + "..."
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{field}: {message}")
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(problems)


def _readable_order_id(value: Any) -> str | None:
    """The order id to name in a rejection, if the payload has a well-formed one."""
    order_id = value.get("order_id") if isinstance(value, dict) else None
    return order_id if isinstance(order_id, str) and _ORDER_ID.fullmatch(order_id) else None
