"""Orders as the tests and the benchmarks build them: a validated `SubmitOrder` for an
agent in-process, and the same order's JSON body as the back office publishes it."""

from __future__ import annotations

from typing import Any

import orjson

from edge_agent.domain import commands as cmd

PRODUCT_IDS = ("widget-a", "gadget-b")  # the products of the simulated profile


def order(
    order_id: str, qty: int = 1, *, product: str = "widget-a", warehouse: str = "WH1", priority: int = 0
) -> cmd.SubmitOrder:
    """An order with its real digest: the same one the agent gives the body it came in."""
    digest = cmd.order_digest(order_id, product, qty, warehouse, priority)
    return cmd.SubmitOrder(order_id, product, qty, warehouse, priority, digest)


def order_body(submitted: cmd.SubmitOrder, **changes: Any) -> dict[str, Any]:
    """The order's JSON object, as published on an orders topic; `changes` replace or add
    fields (of any value: for the bodies that must be rejected)."""
    return {
        "order_id": submitted.order_id,
        "product_id": submitted.product_id,
        "qty": submitted.qty,
        "warehouse": submitted.warehouse,
        "priority": submitted.priority,
        **changes,
    }


def order_payload(submitted: cmd.SubmitOrder) -> bytes:
    """The order's body as the bytes of an MQTT message."""
    return orjson.dumps(order_body(submitted))
