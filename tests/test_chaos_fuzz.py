"""Fuzzed inbound payloads: every one is an order or a rejection, decided in
bounded time and memory, never an exception; through the parser, through the agent's
offer path (a rejection is logged as OrderRejected) and through a real broker.

Whether a payload is a valid order is judged here independently, from the MQTT contract, by
`spec_verdict` (the standard library's JSON parser and plain checks), and compared
with what `order_command` decides. Where the contract leaves the outcome open (duplicate keys,
a byte order mark, lone surrogates, priorities beyond what a careful limit allows) the
verdict is "either".

Bounds are guards against pathological blow-ups, not timings (those are benchmarks):
1 s and 100 times the payload plus 2 MB of traced memory per payload, where a payload
takes well under a millisecond and at most some tens of times its size.

Hypothesis runs derandomized, without its example database, so every run (CI included)
tries the same examples.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import tracemalloc
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import Agent
from edge_agent.config import Config, MqttConfig
from edge_agent.devices.profile import load_profile
from edge_agent.domain import commands as cmd
from edge_agent.domain.events import OrderAccepted, OrderRejected, Recorded
from edge_agent.gateway import Gateway
from edge_agent.log.store import EventLog
from edge_agent.log.verify import verify
from edge_agent.mqtt.inbound import CancelRefused, cancel_command, order_command
from edge_agent.mqtt.topics import Topics
from tests.support import PROFILE
from tests.support.agents import running
from tests.support.brokers import Mosquitto
from tests.support.configs import agent_config
from tests.support.orders import order, order_body
from tests.support.peer import Message, on, peer

pytestmark = pytest.mark.chaos

PRODUCTS = dict(load_profile(PROFILE).max_qty().items())
LIMIT = 65536  # limits.max_payload_bytes, the default
FIELDS = ("order_id", "product_id", "qty", "warehouse", "priority")
REQUIRED = frozenset(FIELDS[:4])
ORDER_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Rejected in a string: C0, DEL and C1; the line and paragraph separators and
# the bidirectional controls, which break or reorder a line wherever the string is shown.
NOT_IN_STRINGS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
CONTROL = re.compile(f"[{NOT_IN_STRINGS}]")
SECOND_S = 1.0
# Measured peaks: orjson takes 13 times a long string's size while parsing it, and
# pydantic's errors about 65 times the size of a payload of thousands of unknown fields.
MEMORY_FACTOR = 100
T = TypeVar("T")
FULLWIDTH = "\uff57\uff49\uff44\uff47\uff45\uff54-\uff41"  # widget-a in fullwidth letters
MAX_REASON = 2000  # a reason a person reads, not an echo of the payload

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,  # the time bound is checked per payload, with tracing on
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- what the contract says a payload is ---------------------------------------------------------------

Verdict = bool | None  # True: a valid order; False: to be rejected; None: the contract leaves it open


class _Open(Exception):
    """The payload is one the contract does not decide."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _Open("duplicate keys: parsers disagree on which one counts")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def spec_json(payload: bytes, max_bytes: int, *, limits_open: bool = False) -> Any:
    """The JSON value the contract sees in the payload; ValueError if it is not one, _Open if open.
    `limits_open`: a number beyond a double's range or nesting deeper than this parser
    takes is open too (RFC 8259 §9 lets a parser set such limits), where it matters
    whether the rest of the payload can be read."""
    if len(payload) > max_bytes:
        raise ValueError("over the size limit")
    text = payload.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.startswith("\ufeff"):
        raise _Open("a byte order mark: RFC 8259 lets a parser refuse it or skip it")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_no_constants,
            parse_int=_int_within_double if limits_open else int,
            parse_float=_float_within_double if limits_open else float,
        )
    except RecursionError:
        if limits_open:
            raise _Open("nested deeper than this parser takes") from None
        raise ValueError("nested too deep for an order") from None
    if _has_surrogate(value):
        raise _Open("a lone surrogate escape: RFC 8259 leaves its meaning unpredictable")
    return value


def _int_within_double(text: str) -> int:
    if len(text.lstrip("-")) > 308:
        raise _Open("an integer beyond a double's range")
    return int(text)


def _float_within_double(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _Open("a number beyond a double's range")
    return number


def _has_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= ch <= "\udfff" for ch in item):
                return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False


def spec_object(payload: bytes, max_bytes: int) -> dict[str, Any] | Verdict:
    """The JSON object the contract sees in the payload; False if there is none, None if the
    contract leaves that open."""
    try:
        value = spec_json(payload, max_bytes)
    except _Open:
        return None
    except ValueError:
        return False
    return value if isinstance(value, dict) else False


def spec_verdict(payload: bytes, max_bytes: int = LIMIT) -> Verdict:
    """Is the payload a valid order by the MQTT contract?"""
    value = spec_object(payload, max_bytes)
    if not isinstance(value, dict):
        return value
    if not REQUIRED <= value.keys() <= set(FIELDS):
        return False
    order_id, product, qty, warehouse = (value[key] for key in FIELDS[:4])
    priority = value.get("priority", 0)
    if not (isinstance(order_id, str) and ORDER_ID.fullmatch(order_id)):
        return False
    if not (isinstance(product, str) and product in PRODUCTS):
        return False
    if not (type(qty) is int and 1 <= qty <= PRODUCTS[product]):
        return False
    if not (isinstance(warehouse, str) and 1 <= len(warehouse) <= 64) or CONTROL.search(warehouse):
        return False
    if not any(not c.isspace() and unicodedata.category(c) != "Cf" for c in warehouse):
        return False  # shows as nothing on any screen
    if type(priority) is not int:
        return False
    return True if abs(priority) <= 1_000_000 else None  # the contract names no range; a bound is careful


def readable_id(payload: bytes, max_bytes: int = LIMIT) -> str | bool | None:
    """The order id a rejection should name: the payload's, when it is a well-formed one
    (the contract: "order_id (if readable)"); False when the contract leaves it open."""
    try:
        value = spec_json(payload, max_bytes, limits_open=True)
    except _Open:
        return False
    except ValueError:
        return None
    order_id = value.get("order_id") if isinstance(value, dict) else None
    return order_id if isinstance(order_id, str) and ORDER_ID.fullmatch(order_id) else None


def spec_cancel(payload: bytes, max_bytes: int = LIMIT) -> Verdict:
    """Is the payload a valid cancel?"""
    value = spec_object(payload, max_bytes)
    if not isinstance(value, dict):
        return value
    if value.keys() != {"order_id"}:
        return False
    order_id = value["order_id"]
    return isinstance(order_id, str) and ORDER_ID.fullmatch(order_id) is not None


# -- payloads ---------------------------------------------------------------------------------------

odd_text = st.sampled_from(
    [
        "",
        " ",
        "widget-a\u200b",  # a zero-width space after a real product id
        FULLWIDTH,  # equal to a product id after NFKC only
        "widget\u2010a",  # a Unicode hyphen
        "WIDGET-A",
        "o1\n",
        "o1\u0000",
        "\u202eo1",  # right-to-left override
        "٣",  # an Arabic-Indic digit: a digit, but not [0-9]
        "é" * 65,
        "e\u0301",  # a combining accent
        "🏭" * 16,
        "\ud800",  # a lone surrogate
        "x" * 64,
        "x" * 65,
    ]
)
warehouses = st.text(  # nothing the contract rejects in a string
    st.characters(
        exclude_categories=("Cc", "Cs"),
        exclude_characters="\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
    ),
    min_size=1,
    max_size=64,
)
any_text = st.text(st.characters(exclude_categories=()), max_size=80) | odd_text  # surrogates included
numbers = (
    st.integers()  # unbounded: 10**50 as JSON text too
    | st.integers(-3, 103)
    | st.floats(allow_nan=True, allow_infinity=True)  # NaN / Infinity: not JSON
    | st.sampled_from([0.0, -0.0, 1.0, 2.5, 1e400, -1e400, 1e-400, 2**63, -(2**63) - 1, 10**20])
)
leaves = st.none() | st.booleans() | numbers | any_text
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)


@st.composite
def order_like(draw: st.DrawFn) -> dict[str, Any]:
    """An order whose every field may be right, wrong, missing or joined by another."""
    order: dict[str, Any] = {}
    good: dict[str, st.SearchStrategy[Any]] = {
        "order_id": st.from_regex(ORDER_ID, fullmatch=True),
        "product_id": st.sampled_from(sorted(PRODUCTS)),
        "qty": st.integers(1, 100),
        "warehouse": warehouses,
        "priority": st.integers(-1_000_000, 1_000_000),
    }
    for name in FIELDS:
        choice = draw(st.sampled_from(["good", "good", "good", "bad", "missing"]))
        if choice == "good":
            order[name] = draw(good[name])
        elif choice == "bad":
            order[name] = draw(json_values)
    for key in draw(st.lists(any_text, max_size=2)):
        order[key] = draw(json_values)
    return order


valid_orders = st.fixed_dictionaries(
    {
        "order_id": st.from_regex(ORDER_ID, fullmatch=True),
        "product_id": st.sampled_from(sorted(PRODUCTS)),
        "qty": st.integers(1, min(PRODUCTS.values())),
        "warehouse": warehouses,
    },
    optional={"priority": st.integers(-1_000_000, 1_000_000)},
)


def encode(value: Any, ascii_only: bool, indent: int | None, sort_keys: bool) -> bytes:
    """JSON text as senders write it; huge ints and non-finite floats as their text
    (`1e400`-sized numbers, `NaN`), lone surrogates as bytes that are not UTF-8."""
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent, sort_keys=sort_keys)
    return text.encode("utf-8", errors="surrogatepass")


def encoded(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(encode, values, st.booleans(), st.sampled_from([None, 0, 2]), st.booleans())


payloads = st.one_of(
    encoded(valid_orders),  # laid out in every way a sender may: all to be accepted
    st.binary(max_size=600),
    encoded(json_values),
    encoded(order_like()),
    encoded(order_like()).map(lambda p: b"\xef\xbb\xbf" + p),  # a byte order mark
    encoded(order_like()).map(lambda p: p.replace(b"1", b"1" + b"0" * 400, 1)),  # a huge number
)


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]", inner: bytes = b"") -> bytes:
    return open_ * depth + inner + close * depth


def order_bytes(**changes: Any) -> bytes:
    """A valid order's body (laid out with spaces: `"qty": 2`), with `changes`."""
    return json.dumps(order_body(order("o-1", 2), **changes)).encode()


PATHOLOGICAL: dict[str, Callable[[], bytes]] = {
    "10_000-deep arrays": lambda: nested(10_000),
    "10_000-deep objects": lambda: nested(10_000, b'{"a":', b"}", b"1"),
    "1_000-deep arrays in qty": lambda: order_bytes().replace(b'"qty": 2', b'"qty": ' + nested(1_000)),
    "1e400": lambda: b"1e400",
    "-1e400 as qty": lambda: order_bytes().replace(b'"qty": 2', b'"qty": -1e400'),
    "1e-400 as qty": lambda: order_bytes().replace(b'"qty": 2', b'"qty": 1e-400'),
    "10**1000 as text": lambda: str(10**1000).encode(),
    "10**1000 as qty": lambda: order_bytes().replace(b'"qty": 2', b'"qty": ' + str(10**1000).encode()),
    "a 5 MB string": lambda: json.dumps("x" * 5_000_000).encode(),
    "a 5 MB order id": lambda: order_bytes(order_id="o" * 5_000_000),
    "a 60 KB warehouse": lambda: order_bytes(warehouse="w" * 60_000),
    "a 60 KB field name": lambda: order_bytes(**{"k" * 60_000: 1}),
    "5_000 unknown fields": lambda: order_bytes(**{f"k{n}": 0 for n in range(5_000)}),
    "a 60 KB array of numbers": lambda: order_bytes(qty=list(range(12_000))),
    "overlong UTF-8": lambda: order_bytes().replace(b"WH1", b"WH\xc0\xb1"),
    "CESU-8 surrogate": lambda: order_bytes().replace(b"WH1", b"WH\xed\xa0\x80"),
    "NUL bytes": lambda: b"\x00" * 1000,
    "a BOM and a valid order": lambda: b"\xef\xbb\xbf" + order_bytes(),
    "NaN": lambda: order_bytes().replace(b'"qty": 2', b'"qty": NaN'),
    "true as qty": lambda: order_bytes(qty=True),
    "qty as a string": lambda: order_bytes(qty="2"),
    "an order as a JSON string": lambda: json.dumps(order_bytes().decode()).encode(),
    "exactly the size limit": lambda: order_bytes().ljust(LIMIT, b" "),
    "one byte over the limit": lambda: order_bytes().ljust(LIMIT + 1, b" "),
}


# -- the bounds ---------------------------------------------------------------------------------------


def bounded(decide: Callable[[], T], size: int) -> T:
    """`decide()`, checked to take under SECOND_S and, at its peak, under MEMORY_FACTOR
    times the payload's size plus 2 MB of traced memory: linear, so that
    limits.max_payload_bytes bounds it (8.5 MB at the default 64 KB)."""
    tracemalloc.start()  # only around the decision: tracing Hypothesis too would triple the run time
    try:
        started = time.perf_counter()
        result = decide()
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert took < SECOND_S, f"{took:.2f} s to decide on {size} bytes"
    assert peak < MEMORY_FACTOR * size + 2_000_000, f"{peak} bytes at the peak to decide on {size} bytes"
    return result


def check_order(payload: bytes, max_bytes: int = LIMIT) -> cmd.SubmitOrder | cmd.RejectOrder:
    """The decision on one payload, checked against the contract."""
    result = bounded(lambda: order_command(payload, PRODUCTS, max_bytes), len(payload))
    assert isinstance(result, cmd.SubmitOrder | cmd.RejectOrder)
    verdict = spec_verdict(payload, max_bytes)
    if verdict is not None:
        assert isinstance(result, cmd.SubmitOrder) == verdict, (payload[:300], result)
    if isinstance(result, cmd.RejectOrder):
        assert result.reason.strip(), "a rejection says why"
        expected_id = readable_id(payload, max_bytes)
        if expected_id is not False:
            assert result.order_id == expected_id, (payload[:300], result.order_id)
    return result


# -- the parser ---------------------------------------------------------------------------------------


@FUZZ
@given(payloads)
def test_any_order_payload_is_accepted_or_rejected_as_spec_says_in_bounded_time_and_memory(payload: bytes) -> None:
    check_order(payload)


@FUZZ
@given(st.one_of(st.binary(max_size=300), encoded(json_values), encoded(st.fixed_dictionaries({"order_id": leaves}))))
def test_any_cancel_payload_is_a_cancel_or_a_reason_in_bounded_time_and_memory(payload: bytes) -> None:
    result = bounded(lambda: cancel_command(payload, LIMIT), len(payload))
    assert isinstance(result, cmd.CancelOrder | CancelRefused)
    verdict = spec_cancel(payload)
    if verdict is not None:
        assert isinstance(result, cmd.CancelOrder) == verdict, (payload[:300], result)
    if isinstance(result, CancelRefused):
        assert result.reason.strip()


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_a_pathological_payload_is_decided_in_bounded_time_and_memory(name: str) -> None:
    payload = PATHOLOGICAL[name]()
    check_order(payload)
    # And with no size limit in the way: the parser itself copes.
    result = check_order(payload, max_bytes=len(payload))
    bounded(lambda: cancel_command(payload, len(payload)), len(payload))
    if name == "exactly the size limit":
        assert isinstance(result, cmd.SubmitOrder)


def test_the_payload_size_limit_is_exact_and_checked_before_anything_is_parsed() -> None:
    """limits.max_payload_bytes: a payload of exactly the limit is read, one byte more is
    rejected as too big, whatever it holds (even bytes that are not UTF-8)."""
    at_limit = order_bytes().ljust(LIMIT, b" ")
    assert isinstance(order_command(at_limit, PRODUCTS, LIMIT), cmd.SubmitOrder)
    for over in (at_limit + b" ", b"\xff" * (LIMIT + 1), nested(LIMIT)):
        result = order_command(over, PRODUCTS, LIMIT)
        assert isinstance(result, cmd.RejectOrder)
        assert f"over the limit of {LIMIT}" in result.reason
        assert f"over the limit of {LIMIT}" in str(cancel_command(over, LIMIT))


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(PATHOLOGICAL["5_000 unknown fields"](), id="5_000 unknown fields"),
        pytest.param(PATHOLOGICAL["a 60 KB field name"](), id="a 60 KB field name"),
        pytest.param(order_bytes(**{"x\n2030-01-01 CRITICAL forged log line": 1}), id="a field name with a newline"),
    ],
)
def test_a_rejection_reason_is_one_short_line_however_the_payload_is_made(payload: bytes) -> None:
    """The reason of a rejection is logged (OrderRejected), published on orders/rejected and
    written to the service log: it must stay a short line, not grow with the payload nor
    carry the sender's line breaks."""
    result = order_command(payload, PRODUCTS, LIMIT)
    assert isinstance(result, cmd.RejectOrder)
    assert len(result.reason) <= MAX_REASON, f"a reason of {len(result.reason)} characters"
    assert "\n" not in result.reason
    assert "\r" not in result.reason


# -- the agent's offer path -------------------------------------------------------------------------------


def fuzz_config(data_dir: Path, **changes: Any) -> Config:
    # Durability is not what these tests are about.
    return agent_config(data_dir, **{"device_id": "chaos-fuzz", "log": {"synchronous": "normal"}, **changes})


def test_through_the_agent_every_payload_is_acknowledged_and_a_rejection_is_logged_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """Each payload, decided as the gateway decides it, is offered to a running agent: it is
    acknowledged once its outcome is committed; a rejection is exactly one OrderRejected
    with the reason and readable id, and no order or work item comes of it."""
    config = fuzz_config(tmp_path)
    loop = asyncio.new_event_loop()
    agent = Agent(config)
    loop.run_until_complete(agent.__aenter__())
    task = loop.create_task(agent.run())
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=300)
    @given(payloads)
    def offer(payload: bytes) -> None:
        order = order_command(payload, dict(agent.state.products.items()), config.limits.max_payload_bytes)
        before = agent.state
        records: list[Recorded] = loop.run_until_complete(asyncio.wait_for(agent.submit(order), 10))
        outcomes[type(records[0].event).__name__ if records else "redelivered"] += 1
        assert not task.done(), "the agent stopped"
        after = agent.state
        if isinstance(order, cmd.RejectOrder):
            assert [type(r.event) for r in records] == [OrderRejected]
            event = records[0].event
            assert isinstance(event, OrderRejected)
            assert (event.order_id, event.reason) == (order.order_id, order.reason)
            assert after.accepted == before.accepted
            assert after.rejected == before.rejected + 1
        elif not records:  # the same order again: a redelivery
            assert agent.journal.known_orders([order.order_id]).get(order.order_id) == order.digest
        else:
            assert [type(r.event) for r in records] in ([OrderAccepted], [OrderRejected])
            if isinstance(records[0].event, OrderRejected):  # the same id with another body
                assert "conflicting duplicate" in records[0].event.reason

    try:
        offer()
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        loop.run_until_complete(agent.__aexit__(None, None, None))
        loop.close()
    with EventLog(config.events_db, readonly=True) as log_:
        assert verify(log_).fault is None
    # Hypothesis ran, every offer was acknowledged, and both outcomes were seen often.
    assert outcomes["OrderAccepted"] >= 20, outcomes
    assert outcomes["OrderRejected"] >= 100, outcomes


# -- over MQTT, on a real broker ------------------------------------------------------------------------

MQTT_LIMIT = 16384  # small enough that "over the limit" is cheap to send


def mqtt_payloads() -> list[tuple[str, bytes, str, str | None]]:
    """(what, payload, words its rejection's reason has, the order id the rejection names)."""
    return [
        ("not UTF-8", b"\xff\xfe{}", "not UTF-8", None),
        ("deep arrays", nested(5_000), "not JSON", None),
        ("1e400", order_bytes(order_id="big-1").replace(b'"qty": 2', b'"qty": 1e400'), "not JSON", None),
        ("10**1000", order_bytes(order_id="big-2").replace(b'"qty": 2', b'"qty": ' + b"9" * 1000), "not JSON", None),
        ("a list", b"[1, 2]", "not an object", None),
        ("qty a string", order_bytes(order_id="typed-1", qty="2"), "qty", "typed-1"),
        ("unknown product", order_bytes(order_id="prod-1", product_id="sprocket"), "unknown product", "prod-1"),
        ("unicode product", order_bytes(order_id="prod-2", product_id=FULLWIDTH), "unknown product", "prod-2"),
        ("over the limit", order_bytes(order_id="huge-1").ljust(MQTT_LIMIT + 1, b" "), "over the limit", None),
        ("2 MB", b"x" * 2_000_000, "over the limit", None),
    ]


def test_over_mqtt_nasty_payloads_are_rejected_on_the_rejected_topic_and_the_agent_stays_up(
    tmp_path: Path, mosquitto_broker: Mosquitto
) -> None:
    """Through Mosquitto and the gateway: each bad order is rejected on {p}/{d}/orders/rejected
    with its reason (and its id when readable), a payload of exactly the size limit is an
    order; bad cancels change nothing; the agent stays online throughout."""
    device_id = f"fuzz-{uuid.uuid4().hex[:8]}"
    config = fuzz_config(
        tmp_path / "var",
        device_id=device_id,
        mqtt=MqttConfig(port=mosquitto_broker.port, protocol="5"),
        limits={"max_payload_bytes": MQTT_LIMIT},
    )
    topics = Topics("factory", device_id)
    nasty = mqtt_payloads()
    at_limit = order_bytes(order_id="exact-1").ljust(MQTT_LIMIT, b" ")

    async def scenario() -> list[Message]:
        with peer(mosquitto_broker.port, "5", f"factory/{device_id}/#", name="back-office") as office:
            async with Agent(config) as agent, running(agent):
                gateway = Gateway(agent, config)
                gateway_task = asyncio.create_task(gateway.run())
                try:
                    await asyncio.to_thread(office.wait_for, on(topics.status, state="online"))
                    mark = office.mark()
                    for _, payload, _, _ in nasty:
                        await asyncio.to_thread(office.publish, topics.device_orders, payload)
                    for bad in (b"{", b"[]", b'{"order_id": 5}', b'{"order_id": "nope"}', b"\xff" * 100_000):
                        await asyncio.to_thread(office.publish, topics.cancel, bad)
                    await asyncio.to_thread(office.publish, topics.device_orders, at_limit)
                    position = mark
                    for _ in nasty:  # a rejection for each, in the order they were sent
                        found = await asyncio.to_thread(office.wait_for, on(topics.rejected), since=position)
                        position = next(n for n, m in enumerate(office.messages()) if m is found) + 1
                    await asyncio.to_thread(office.wait_for, on(topics.events, type="OrderAccepted"), since=mark)
                    assert not gateway_task.done()
                    assert agent.fault is None
                    return office.messages()[mark:]
                finally:
                    gateway_task.cancel()
                    await asyncio.gather(gateway_task, return_exceptions=True)

    received = asyncio.run(scenario())
    answers = [m.json() for m in received if m.topic == topics.rejected]
    refused_cancels = [a for a in answers if a["reason"].startswith("cancel refused: ")]
    assert len(refused_cancels) == 5, answers  # each bad cancel is answered, and changes nothing
    rejected = [a for a in answers if a not in refused_cancels]
    assert len(rejected) == len(nasty), rejected
    for (what, _, words, order_id), rejection in zip(nasty, rejected, strict=True):
        assert words in rejection["reason"], (what, rejection)
        assert rejection["order_id"] == order_id, (what, rejection)
    events = [m.json() for m in received if m.topic == topics.events]
    assert [e["subject"] for e in events if e["type"] == "OrderAccepted"] == ["exact-1"]
    assert not [e for e in events if e["type"] == "OrderCancelled"]
    statuses = [m.json()["state"] for m in received if m.topic == topics.status]
    assert "offline" not in statuses
