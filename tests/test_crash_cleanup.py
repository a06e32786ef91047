"""A server killed outright leaves no worker process and no shared memory behind."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.client import AvatarClient

pytestmark = pytest.mark.slow


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of ours counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_sigkilled_server_leaves_no_worker_and_no_segments(make_server) -> None:
    srv = make_server()
    worker_pid = srv.stats()["worker_pid"]
    client = AvatarClient(srv.url)
    await client.connect()
    rings = {p.name for p in Path("/dev/shm").glob(f"lipsync_{client.session_id}*")}
    assert len(rings) == 1
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (alive(worker_pid) or any((Path("/dev/shm") / r).exists() for r in rings)):
        await asyncio.sleep(0.1)
    try:
        assert not alive(worker_pid), "the worker outlived its server"
        assert not any((Path("/dev/shm") / r).exists() for r in rings), "a ring outlived its server"
    finally:
        await client.close()
