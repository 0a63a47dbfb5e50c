"""The service log tells each order's story: one info line per business event."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.domain import commands as cmd
from edge_agent.log.journal import Journal
from tests.plant import produce, run

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
            run(journal, cmd.SubmitOrder(order_id, "gadget-b", 1, "WH2", 5, f"digest-{order_id}"))
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
