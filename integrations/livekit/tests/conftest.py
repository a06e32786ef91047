from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing"))  # the integrations' shared server helper
from serverproc import SERVER_PYTHON, Server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real lip-sync server, from the main environment."""
    if not SERVER_PYTHON.exists():
        pytest.fail(f"no server environment at {SERVER_PYTHON}: run ./run.sh once (or set LIPSYNC_SERVER_PYTHON)")
    srv = Server(tmp_path_factory.mktemp("lipsync-data"))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
