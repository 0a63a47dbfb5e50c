"""`edge-agent order submit` and `order cancel`: publish an order or a cancel to the
configured broker, and follow what becomes of it."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import uuid
from typing import Annotated, Any

import msgspec
import orjson
import typer
from pydantic import ValidationError

from edge_agent.cli import display
from edge_agent.cli.options import ConfigOption
from edge_agent.config import Config, load_config
from edge_agent.domain import events as ev
from edge_agent.domain.commands import order_digest
from edge_agent.domain.decide import CONFLICT_REASON
from edge_agent.errors import ConfigError, EdgeAgentError
from edge_agent.log.schema import CANCELLED, FAILED
from edge_agent.log.store import EventLog
from edge_agent.mqtt.client import CONNECT_TIMEOUT_S, PublishUnconfirmed, Session, session
from edge_agent.mqtt.inbound import CancelPayload, OrderPayload, describe
from edge_agent.mqtt.topics import Topics

order_app = typer.Typer(help="Submit and cancel orders through the configured broker.", no_args_is_help=True)


class OrderNotCompleted(EdgeAgentError):
    """The order was rejected, failed or cancelled, or did not finish in time."""


def _device_id_rule() -> re.Pattern[str]:
    """The config's own rule for `device_id`: a `--device` is held to the same."""
    for meta in Config.model_fields["device_id"].metadata:
        if isinstance(pattern := getattr(meta, "pattern", None), str):
            return re.compile(pattern)
    raise AssertionError("device_id has no pattern")  # pragma: no cover


_DEVICE_ID = _device_id_rule()


def checked_device(device: str | None) -> str | None:
    """`--device` as given, refused (exit 2) unless a device id: not a topic level such as
    `a/b` or `#`, nor an empty one, which would send to other devices or to the fleet."""
    if device is not None and not _DEVICE_ID.fullmatch(device):
        shown = display.printable(device)
        raise ConfigError(f"--device: {shown!r} is not a device id (1 to 64 of A-Z a-z 0-9 . _ : -)", key="--device")
    return device


class _Event(msgspec.Struct):
    """An `events` message as the agent sends it (other keys are passed over)."""

    device_id: str
    seq: int
    type: str
    subject: str
    data: dict[str, Any]


def _event(body: object) -> _Event | None:
    """The message as an event, or None for anything an agent does not send."""
    try:
        return msgspec.convert(body, _Event)
    except msgspec.ValidationError:
        return None


def _message_bytes(settings: Config) -> int:
    """The largest message an agent sends about an order: its body, twice over, plus room
    for the event's own fields; anything bigger is not an agent's (MQTT 5 drops it unread)."""
    return 2 * settings.limits.max_payload_bytes + 65536


def _milestone(event: _Event) -> str | None:
    """What a person wants to see of one of the order's events (None: not worth a line)."""
    data = event.data
    return {
        ev.OrderAccepted.__name__: f"accepted by {event.device_id}",
        ev.OrderQueued.__name__: "waiting for a station",
        ev.StationAssigned.__name__: f"building on {data.get('station')}",
        ev.UnitBuilt.__name__: "unit built",
        ev.BuildComplete.__name__: "built; waiting for the shipping lane",
        ev.ShipmentStarted.__name__: "moving to the warehouse",
        ev.RetryScheduled.__name__: f"retrying: {data.get('reason')}",
        ev.InventoryIssued.__name__: f"inventory {data.get('inventory_id')} in {data.get('warehouse')}",
    }.get(event.type)


@order_app.command()
def submit(
    product: Annotated[str, typer.Argument(help="The product id, e.g. widget-a.")],
    qty: Annotated[int, typer.Argument(help="How many units.")],
    warehouse: Annotated[str, typer.Option("--warehouse", help="Where the batch goes.")],
    order_id: Annotated[
        str | None, typer.Option("--order-id", help="The idempotency key \\[default: a new one].")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Send to this device only (else the fleet).")] = None,
    priority: Annotated[int, typer.Option("--priority", help="Higher is built first.")] = 0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the order to its inventory id, rejection or failure.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait with --wait.")] = 300.0,
    config: ConfigOption = None,
) -> None:
    """Publish an order (QoS 1); with --wait, follow it. Exit 1 on rejection, failure or timeout."""
    device = checked_device(device)
    settings = load_config(config)
    prefix = settings.mqtt.topic_prefix
    order_id = order_id or f"order-{uuid.uuid4().hex[:12]}"
    body = {"order_id": order_id, "product_id": product, "qty": qty, "warehouse": warehouse, "priority": priority}
    try:  # the checks every agent makes, before anything is sent
        OrderPayload.model_validate(body)
    except ValidationError as error:
        field = str(error.errors()[0]["loc"][0])
        raise ConfigError(describe(error), key=field) from error
    topic = f"{prefix}/{device}/orders" if device is not None else f"{prefix}/orders"
    follow = [f"{prefix}/{device or '+'}/events"] if wait else []
    asyncio.run(_submit(settings, topic, follow, body, device, timeout))


async def _submit(
    settings: Config, topic: str, follow: list[str], body: dict[str, Any], device: str | None, timeout: float
) -> None:
    """Publish the order; if `follow` names topics (--wait), follow it there."""
    async with session(settings.mqtt, follow, _message_bytes(settings), min(timeout, CONNECT_TIMEOUT_S)) as client:
        try:
            await client.publish(topic, orjson.dumps(body), timeout_s=min(timeout, 30.0))
        except PublishUnconfirmed as error:
            again = f"send it again with --order-id {body['order_id']}: a repeat of the same order is not built twice"
            raise PublishUnconfirmed(f"{error}; it may have been delivered: {again}") from None
        display.out.print(f"submitted {body['order_id']} to {topic}", markup=False)
        # A device answers nothing to an order id it has taken: if its log is here, ask it.
        if follow and not _answered_by_the_log(settings, device, body):
            await _follow(client, body["order_id"], timeout)


def _answered_by_the_log(settings: Config, device: str | None, body: dict[str, Any]) -> bool:
    """If the configured log (of the device the order went to) is readable here and already
    records the order as finished (or under another body), say how it ended: True after
    printing it (exit 0), else OrderNotCompleted. False: no such log here, or the order is
    new or still live. Read-only, and a log that cannot be read is the same as none: the
    device's messages still answer."""
    order_id = body["order_id"]
    path = settings.events_db
    if device not in (None, settings.device_id) or not os.access(path, os.R_OK):
        return False
    try:
        with EventLog(path, readonly=True) as log_:
            record = log_.order_record(order_id)
            ending = None
            if record is not None and record.outcome_seq is not None:
                ending = next(iter(log_.rows(record.outcome_seq, record.outcome_seq)), None)
    except (EdgeAgentError, sqlite3.Error):
        return False
    if record is None:
        return False
    if record.digest != order_digest(**body):
        raise OrderNotCompleted(f"order {order_id} rejected: {CONFLICT_REASON} (as the log {path} records)")
    if record.outcome is None:
        return False  # live: its next events come over MQTT
    data = orjson.loads(ending.data) if ending is not None else {}
    if record.outcome == FAILED:
        reason = data.get("reason", "its reason compacted away")
        raise OrderNotCompleted(f"order {order_id} failed: {reason} (already, as the log {path} records)")
    if record.outcome == CANCELLED:
        raise OrderNotCompleted(f"order {order_id} was cancelled (already, as the log {path} records)")
    warehouse = data.get("warehouse", body["warehouse"])
    display.out.print(f"already finished: inventory {record.outcome} in {warehouse}", markup=False)
    return True


async def _follow(client: Session, order_id: str, timeout: float) -> None:
    heard = False
    seen: set[tuple[str, int]] = set()  # (device_id, seq): an event sent again after a restart is one event
    async for _, body in client.received(timeout):
        event = _event(body)
        if event is None or event.subject != order_id or (event.device_id, event.seq) in seen:
            continue
        seen.add((event.device_id, event.seq))
        heard = True
        kind = event.type
        if kind in (ev.OrderRejected.__name__, ev.OrderFailed.__name__):
            outcome = kind.removeprefix("Order").lower()
            raise OrderNotCompleted(f"order {order_id} {outcome}: {event.data.get('reason')}")
        if kind == ev.OrderCancelled.__name__:
            raise OrderNotCompleted(f"order {order_id} was cancelled")
        line = _milestone(event)
        if line:
            display.out.print(display.printable(line), markup=False)
        if kind == ev.InventoryIssued.__name__:
            return
    advice = (
        ""
        if heard
        else "; nothing was heard of it: the device may be down or unreachable, or it took this order id "
        f"before (a repeated id gets no answer); check with `edge-agent status` or "
        f"`edge-agent log show --subject {order_id}` on the device"
    )
    raise OrderNotCompleted(f"order {order_id} did not reach the warehouse within {timeout:g} s{advice}")


@order_app.command()
def cancel(
    order_id: Annotated[str, typer.Argument(help="The order to cancel.")],
    device: Annotated[
        str | None, typer.Option("--device", help="The device building it \\[default: the config's device_id].")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the device's answer.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait with --wait.")] = 30.0,
    config: ConfigOption = None,
) -> None:
    """Ask a device to cancel an order (QoS 1); with --wait, exit 0 once it is cancelled, 1 if refused."""
    device = checked_device(device)
    settings = load_config(config)
    try:  # the check the agent makes, before anything is sent
        CancelPayload.model_validate({"order_id": order_id})
    except ValidationError as error:
        raise ConfigError(describe(error), key="order_id") from error
    device = settings.device_id if device is None else device
    topics = Topics(settings.mqtt.topic_prefix, device)
    follow = [topics.events, topics.rejected] if wait else []
    asyncio.run(_cancel(settings, topics, follow, order_id, timeout))


async def _cancel(settings: Config, topics: Topics, follow: list[str], order_id: str, timeout: float) -> None:
    """Publish the cancel; if `follow` names topics (--wait), wait for the device's answer there."""
    async with session(settings.mqtt, follow, _message_bytes(settings), min(timeout, CONNECT_TIMEOUT_S)) as client:
        cancel = orjson.dumps({"order_id": order_id})
        try:
            await client.publish(topics.cancel, cancel, timeout_s=min(timeout, 30.0), what="cancel")
        except PublishUnconfirmed as error:
            raise PublishUnconfirmed(f"{error}; it may have been delivered: asking again is safe") from None
        display.out.print(f"asked {topics.device_id} to cancel {order_id}", markup=False)
        if follow:
            await _follow_cancel(client, topics, order_id, timeout)


async def _follow_cancel(client: Session, topics: Topics, order_id: str, timeout: float) -> None:
    """Until the device logs the cancel (exit 0) or answers that it cannot apply (exit 1)."""
    async for topic, body in client.received(timeout):
        if not isinstance(body, dict) or order_id not in (body.get("subject"), body.get("order_id")):
            continue
        if topic == topics.events and body.get("type") == ev.OrderCancelled.__name__:
            display.out.print(f"order {order_id} cancelled", markup=False)
            return
        reason = str(body.get("reason", ""))
        if topic == topics.rejected and reason.startswith("cancel refused"):
            raise OrderNotCompleted(f"order {order_id}: {reason}")
    raise OrderNotCompleted(f"no answer from {topics.device_id} about cancelling {order_id} within {timeout:g} s")
