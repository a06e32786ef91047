from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))  # the integrations' shared server helper
from serverproc import SERVER_PYTHON, Server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not SERVER_PYTHON.exists():
        pytest.fail(f"no server environment at {SERVER_PYTHON}: run ./run.sh once (or set LIPSYNC_SERVER_PYTHON)")
    srv = Server(tmp_path_factory.mktemp("lipsync-data"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    """Keeps each phase's report on the test, so a fixture can print the server's log on failure."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())
