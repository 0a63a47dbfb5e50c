"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Mosquitto, mosquitto


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free port of 127.0.0.1, anonymous access allowed."""
    with mosquitto(tmp_path / "mosquitto") as broker:
        yield broker
