"""What happened, in words: one line per business event, for the service log.

Pure: the line depends on the event alone. Workflow bookkeeping (steps, timers,
units) has no line of its own; a person reading the journal follows an order
through accepted, building, built, shipping, its inventory id (or its failure).
"""

from __future__ import annotations

import re

from edge_agent.domain import events as ev

# Characters no string from outside may hold, and none is shown raw: C0, DEL and C1 move a
# terminal's cursor, ring its bell or start an escape sequence; the line and paragraph
# separators (U+2028, U+2029) break a line where a reader (or a log parser) sees none; the
# bidirectional controls (U+200E, U+200F, U+061C, U+202A-U+202E, U+2066-U+2069) reorder
# what is displayed, so that one id reads as another. Inbound validation rejects them.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every `UNPRINTABLE` character escaped (`\\x1b`, `\\u202e`), so that a value
    taken from the log can never move a terminal's cursor, forge a line of the journal or
    show itself reordered."""
    return UNPRINTABLE.sub(_escape, text)


def describe(event: ev.Event) -> str | None:
    """The line that tells `event`, or None for bookkeeping no one reads the journal for."""
    match event:
        case ev.OrderAccepted(order_id, product_id, qty, warehouse, priority):
            ranked = f", priority {priority}" if priority else ""
            return f"order {order_id} accepted: {qty} x {product_id} for {printable(warehouse)}{ranked}"
        case ev.OrderRejected(order_id, reason):
            return f"order {order_id or '(no readable id)'} rejected: {printable(reason)}"
        case ev.StationAssigned(order_id, station):
            return f"order {order_id} building on {station}"
        case ev.BuildComplete(order_id, station):
            return f"order {order_id} built on {station}"
        case ev.ShipmentStarted(order_id):
            return f"order {order_id} shipping"
        case ev.InventoryIssued(order_id, inventory_id, _, _, warehouse):
            return f"order {order_id} in warehouse {printable(warehouse)} as {inventory_id}"
        case ev.RetryScheduled(order_id, attempt, reason):
            return f"order {order_id}: {printable(reason)}; retry {attempt}"
        case ev.OrderFailed(order_id, reason):
            return f"order {order_id} failed: {printable(reason)}"
        case ev.OrderCancelled(order_id):
            return f"order {order_id} cancelled"
        case ev.EstopEngaged():
            return "e-stop engaged: every output off"
        case ev.EstopReleased():
            return "e-stop released: work resumes"
        case _:
            return None
