"""The service log tells each order's story: one info line per business event."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.domain import commands as cmd
from edge_agent.log.journal import Journal
from tests.support.orders import order
from tests.support.plant import produce, run

JOURNAL_LOGGER = "edge_agent.log.journal"


def story(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == JOURNAL_LOGGER
        and record.levelno == logging.INFO
        and record.getMessage().startswith(("order ", "e-stop "))
    ]


def test_an_order_is_told_once_per_milestone_and_bookkeeping_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=JOURNAL_LOGGER)
    with Journal.open(tmp_path / "events.db") as journal:
        produce(journal, 1, qty=2)
        assert story(caplog) == [
            "order o0 accepted: 2 x widget-a for WH1",
            "order o0 building on s1",
            "order o0 built on s1",
            "order o0 shipping",
            "order o0 in warehouse WH1 as INV00001",
        ]


def test_rejections_failures_cancels_and_the_estop_are_told_with_their_reasons(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=JOURNAL_LOGGER)
    with Journal.open(tmp_path / "events.db") as journal:
        produce(journal, 0)
        run(journal, cmd.RejectOrder("r-1", "qty: Input should be a valid integer"))
        run(journal, cmd.RejectOrder(None, "payload is not JSON"))
        for order_id in ("c-1", "f-1"):
            run(journal, order(order_id, product="gadget-b", warehouse="WH2", priority=5))
        run(journal, cmd.CancelOrder("c-1"))
        run(journal, cmd.FailOrder("f-1", "station s2 reported a fault"))
        run(journal, cmd.EngageEstop())
        run(journal, cmd.ReleaseEstop())
    assert story(caplog) == [
        "order r-1 rejected: qty: Input should be a valid integer",
        "order (no readable id) rejected: payload is not JSON",
        "order c-1 accepted: 1 x gadget-b for WH2, priority 5",
        "order f-1 accepted: 1 x gadget-b for WH2, priority 5",
        "order c-1 cancelled",
        "order f-1 failed: station s2 reported a fault",
        "e-stop engaged: every output off",
        "e-stop released: work resumes",
    ]


def test_a_line_never_carries_a_control_character_from_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=JOURNAL_LOGGER)
    with Journal.open(tmp_path / "events.db") as journal:
        run(journal, cmd.RejectOrder("r-2", "warehouse: \x1b[2J\nINFO forged line\x07\x9b"))
    (line,) = story(caplog)
    assert line == "order r-2 rejected: warehouse: \\x1b[2J\\x0aINFO forged line\\x07\\x9b"


# Line and paragraph separators, then bidirectional controls: they break a line, or show a
# value reordered ("WH1" + RLO + "evil" reads "WH1live"), wherever it is printed raw.
REORDERING = "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
HIDDEN_WAREHOUSE = "WH1\u202eevil\u2028INFO forged"  # as an old log or a `--db` file may hold it


def test_a_line_never_carries_a_line_separator_or_bidirectional_control_from_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=JOURNAL_LOGGER)
    with Journal.open(tmp_path / "events.db") as journal:
        produce(journal, 0)
        run(journal, order("b-1", warehouse=HIDDEN_WAREHOUSE))
        run(journal, cmd.RejectOrder("r-3", f"warehouse: {REORDERING}"))
    accepted, rejected = story(caplog)
    assert accepted == "order b-1 accepted: 1 x widget-a for WH1\\u202eevil\\u2028INFO forged"
    assert rejected == "order r-3 rejected: warehouse: " + "".join(f"\\u{ord(c):04x}" for c in REORDERING)


def test_status_never_prints_a_line_separator_or_bidirectional_control_from_the_log(tmp_path: Path) -> None:
    path = tmp_path / "old" / "events.db"
    with Journal.open(path) as journal:
        produce(journal, 0)
        run(journal, order("b-1", warehouse=HIDDEN_WAREHOUSE))
        run(journal, cmd.FailOrder("b-1", f"jam {REORDERING}"))
    result = CliRunner().invoke(app, ["status", "--db", str(path)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert not any(char in result.stdout for char in REORDERING), repr(result.stdout)
    assert "WH1\\u202eevil\\u2028INFO forged" in result.stdout  # escaped: the operator still sees it is there
