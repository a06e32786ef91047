from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))  # the integrations' shared server fixture
from server_fixture import server  # noqa: F401 - the fixture, registered by being here


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keeps each phase's report on the test, so a fixture can print the server's log on failure."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
