"""Demo orders for `edge-agent run --demo N`: a cell busy from the first second."""

from __future__ import annotations

from edge_agent.devices.profile import Profile
from edge_agent.domain import commands as cmd


def demo_orders(count: int, profile: Profile) -> list[cmd.SubmitOrder]:
    """`count` small orders over the profile's products; the same ids every time, so a
    restart does not order them again."""
    products = [p.product_id for p in profile.products]
    orders = []
    for n in range(1, count + 1):
        order_id = f"demo-{n:04d}"
        product = products[n % len(products)]
        qty, priority = 1 + n % 3, n % 2
        digest = cmd.order_digest(order_id, product, qty, "WH1", priority)  # as if it came over MQTT
        orders.append(cmd.SubmitOrder(order_id, product, qty, "WH1", priority, digest))
    return orders
