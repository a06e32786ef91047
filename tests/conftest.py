"""Shared fixtures: a real server process (``python -m server``) on a free loopback port."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server_process import ServerProcess


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for the run, so the default avatar is built once."""
    path = Path(os.environ.get("LIPSYNC_TEST_DATA_DIR") or tmp_path_factory.mktemp("data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def server(data_dir: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(data_dir)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def make_server(data_dir: Path) -> Iterator:
    """Start an extra server with its own flags (for tests that break or limit it)."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        srv = ServerProcess(data_dir, *args)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()
