"""What happened, in words: one line per business event, for the service log.

Pure: the line depends on the event alone. Workflow bookkeeping (steps, timers,
units) has no line of its own; a person reading the journal follows an order
through accepted, building, built, shipping, its inventory id (or its failure).
"""

from __future__ import annotations

import re

from edge_agent.domain import events as ev

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters (C0, DEL, C1) escaped, so that a value taken
    from the log can never move a terminal's cursor or forge a line of the journal."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


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
