"""Inbound payloads: every one becomes an order or a rejection with a reason, never a crash."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.domain import commands as cmd
from edge_agent.mqtt.inbound import CancelRefused, cancel_command, order_command

PRODUCTS = {"widget-a": 100, "gadget-b": 20}
LIMIT = 4096
GOOD = {"order_id": "o-1", "product_id": "widget-a", "qty": 2, "warehouse": "WH1"}


def reject_reason(payload: bytes) -> tuple[str | None, str]:
    result = order_command(payload, PRODUCTS, LIMIT)
    assert isinstance(result, cmd.RejectOrder), result
    return result.order_id, result.reason


def with_(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes})


def with_number(field: str, number: int) -> bytes:
    """An order with an integer of any size in `field` (orjson writes 64 bits at most)."""
    return with_(**{field: "@"}).replace(b'"@"', str(number).encode())


def test_a_valid_order_becomes_a_submission_with_a_digest_of_its_body() -> None:
    result = order_command(orjson.dumps(GOOD), PRODUCTS, LIMIT)
    assert isinstance(result, cmd.SubmitOrder)
    assert (result.order_id, result.product_id, result.qty, result.warehouse, result.priority) == (
        "o-1",
        "widget-a",
        2,
        "WH1",
        0,
    )
    reordered = b'{"warehouse":"WH1","qty":2,"product_id":"widget-a","order_id":"o-1"}'
    same = order_command(reordered, PRODUCTS, LIMIT)
    assert isinstance(same, cmd.SubmitOrder)
    assert same.digest == result.digest  # the same order, however laid out
    other = order_command(with_(qty=3), PRODUCTS, LIMIT)
    assert isinstance(other, cmd.SubmitOrder)
    assert other.digest != result.digest


@pytest.mark.parametrize(
    ("payload", "order_id", "reason"),
    [
        (b"not json", None, "not JSON"),
        (b"\xff\xfe{}", None, "not UTF-8"),
        (b"x" * (LIMIT + 1), None, f"over the limit of {LIMIT}"),
        (b"[1, 2]", None, "payload is a JSON array, not an object"),
        (b"null", None, "payload is JSON null, not an object"),
        (b"12", None, "payload is a JSON number, not an object"),
        (b"true", None, "payload is a JSON boolean, not an object"),
        (b"[" * 2000 + b"]" * 2000, None, "not JSON: nested deeper than 1024 levels"),
        (b'"just a string"', None, "payload is a JSON string, not an object"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "qty"}), "o-1", "qty: Field required"),
        (with_(colour="red"), "o-1", "colour: unknown field"),
        (with_(qty="3"), "o-1", "qty: Input should be a valid integer"),
        (with_(qty=True), "o-1", "qty: Input should be a valid integer"),
        (with_(qty=2.0), "o-1", "qty: Input should be a valid integer"),
        (with_(qty=0), "o-1", "qty: Input should be greater than or equal to 1"),
        (with_(qty=101), "o-1", "qty 101 is over the largest 100 for widget-a"),
        (with_number("qty", 10**27), "o-1", "qty: out of range (from 1 to 9223372036854775807)"),
        (with_number("qty", int("9" * 40)), "o-1", "qty: out of range"),
        (with_(qty=2**64 - 1), "o-1", "qty: Input should be less than or equal to 9223372036854775807"),
        (with_number("priority", -(2**63) - 1), "o-1", "priority: out of range (from -1000000 to 1000000)"),
        (with_(priority=2**64 - 1), "o-1", "priority: Input should be less than or equal to 1000000"),
        (with_(product_id="sprocket"), "o-1", "unknown product 'sprocket'"),
        (with_(order_id="has space"), None, "order_id: String should match pattern"),
        (with_(order_id="x" * 65), None, "order_id"),
        (with_(warehouse=""), "o-1", "warehouse"),
        (with_(warehouse=" "), "o-1", "warehouse: must show a visible character"),
        (with_(warehouse="\u00a0\u200b"), "o-1", "warehouse: must show a visible character"),
        (with_(priority="high"), "o-1", "priority"),
    ],
)
def test_every_bad_input_is_rejected_with_a_reason(payload: bytes, order_id: str | None, reason: str) -> None:
    got_id, got_reason = reject_reason(payload)
    assert got_id == order_id
    assert reason in got_reason


def test_a_cancel_needs_exactly_an_order_id() -> None:
    assert cancel_command(b'{"order_id": "o-1"}', LIMIT) == cmd.CancelOrder("o-1")
    assert cancel_command(b'{"order_id": "o-1", "now": true}', LIMIT) == CancelRefused("o-1", "now: unknown field")
    assert cancel_command(b"{", LIMIT) == CancelRefused(None, "payload is not JSON")


@pytest.mark.parametrize(
    "payload",
    [b"not json {", b"{", b'{"order_id": "o-1",}', b"{} {}", b"nul", b'{"a": tru}', b"\xef\xbb\xbf{}"],
)
def test_a_payload_that_is_not_json_is_said_so_without_the_parser_s_internals(payload: bytes) -> None:
    assert reject_reason(payload) == (None, "payload is not JSON")
    assert cancel_command(payload, LIMIT) == CancelRefused(None, "payload is not JSON")


def test_an_empty_payload_is_said_to_be_empty() -> None:
    assert reject_reason(b"") == (None, "payload is empty, not JSON")


CONTROL = ["\x00", "\x07", "\n", "\r", "\t", "\x1b", "\x1f", "\x7f", "\x80", "\x85", "\x9b", "\x9f"]


@pytest.mark.parametrize("char", CONTROL)
@pytest.mark.parametrize("field", ["product_id", "warehouse"])
def test_a_control_character_in_any_string_field_is_rejected_and_named(field: str, char: str) -> None:
    payload = with_(**{field: f"WH{char}1"})  # escaped in the JSON text, a control character once parsed
    order_id, reason = reject_reason(payload)
    assert order_id == "o-1"
    assert reason == f"{field}: must not contain a control character (U+{ord(char):04X} at 2)"
    assert char not in reason


@pytest.mark.parametrize("char", ["\x1b", "\x9b", "\x00", "\u2028", "\u202e"])
def test_a_control_character_in_an_order_id_is_named_in_an_order_and_a_cancel(char: str) -> None:
    order_id, reason = reject_reason(with_(order_id=f"X{char}"))
    assert order_id is None
    assert reason.startswith("order_id: must not contain ")
    assert reason.endswith(f"(U+{ord(char):04X} at 1)")
    assert cancel_command(orjson.dumps({"order_id": f"X{char}"}), LIMIT) == CancelRefused(None, reason)


SEPARATORS = ["\u2028", "\u2029"]
BIDI = [
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200e",
    "\u200f",
    "\u061c",
]


@pytest.mark.parametrize(
    ("char", "kind"),
    [(c, "a line or paragraph separator") for c in SEPARATORS] + [(c, "a bidirectional control") for c in BIDI],
)
@pytest.mark.parametrize("field", ["product_id", "warehouse"])
def test_a_line_separator_or_bidirectional_control_in_any_string_field_is_rejected_and_named(
    field: str, char: str, kind: str
) -> None:
    order_id, reason = reject_reason(with_(**{field: f"WH{char}1"}))
    assert order_id == "o-1"
    assert reason == f"{field}: must not contain {kind} (U+{ord(char):04X} at 2)"
    assert char not in reason


def test_text_beyond_control_characters_is_accepted() -> None:
    result = order_command(with_(warehouse="Lager Süd \u2013 Halle 3 \u00a0✓"), PRODUCTS, LIMIT)
    assert isinstance(result, cmd.SubmitOrder)
    assert result.warehouse == "Lager Süd \u2013 Halle 3 \u00a0✓"


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        (b'{"order_id": "o-1", "product_id": "widget-a", "qty": 1, "qty": 90, "warehouse": "WH1"}', "qty"),
        (b'{"order_id":"o-1","order_id":"o-2","product_id":"widget-a","qty":1,"warehouse":"WH1"}', "order_id"),
        (b'{"warehouse" : "A", "order_id": "o-1", "product_id": "widget-a", "qty": 1, "warehouse" : "B"}', "warehouse"),
        (b'{"order_id": "o-1", "product_id": "widget-a", "qty": 1, "warehouse": "W:", "qty": 2}', "qty"),
        (b'{"\\u0071ty": 1, "order_id": "o-1", "product_id": "widget-a", "qty": 2, "warehouse": "WH1"}', "qty"),
    ],
)
def test_a_key_given_twice_is_rejected_not_resolved_to_the_last(payload: bytes, key: str) -> None:
    readable = None if key == "order_id" else "o-1"  # which of two ids is meant nobody can say
    assert reject_reason(payload) == (readable, f"payload has the key '{key}' twice")
    refused = cancel_command(payload, LIMIT)
    assert refused == CancelRefused(readable, f"payload has the key '{key}' twice")


def test_colons_and_nested_objects_without_a_key_twice_are_not_taken_for_one() -> None:
    colons = with_(warehouse='hall "3": left', product_id="widget-a")
    assert isinstance(order_command(colons, PRODUCTS, LIMIT), cmd.SubmitOrder)
    nested = with_(extra={"qty": 1, "x": {"qty": 2}})
    assert reject_reason(nested) == ("o-1", "extra: unknown field")
    assert cancel_command(b'{"order_id": "o-1", "x": {"a": 1}, "y": {"a": 2}}', LIMIT) == CancelRefused(
        "o-1", "x: unknown field; y: unknown field"
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), json_values.map(orjson.dumps), st.builds(with_, qty=json_values)))
def test_any_payload_is_an_order_or_a_rejection_never_a_crash(payload: bytes) -> None:
    result = order_command(payload, PRODUCTS, LIMIT)
    assert isinstance(result, cmd.SubmitOrder | cmd.RejectOrder)
    if isinstance(result, cmd.RejectOrder):
        assert result.reason
        assert len(result.reason) < 2000  # a reason, not an echo of the payload
