"""The real lip-sync server for the integrations' tests (pipecat, LiveKit). Their
environments have the framework, not the server's packages, so the server runs from the
main environment (``.venv``, or ``LIPSYNC_SERVER_PYTHON``) through the test suite's own
``tests.support.server_process`` (standard library only)."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository
sys.path.insert(0, str(ROOT))
from tests.support.server_process import ServerProcess  # noqa: E402

SERVER_PYTHON = ROOT / (os.environ.get("LIPSYNC_SERVER_PYTHON") or Path(os.environ.get("LIPSYNC_VENV", ".venv"), "bin", "python"))

__all__ = ["SERVER_PYTHON", "ServerProcess", "server"]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the whole run; the tests' sessions share it."""
    if not SERVER_PYTHON.exists():
        pytest.fail(f"no server environment at {SERVER_PYTHON}: run ./run.sh once (or set LIPSYNC_SERVER_PYTHON)")
    srv = ServerProcess(tmp_path_factory.mktemp("lipsync-data"), python=SERVER_PYTHON)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
