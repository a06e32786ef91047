"""``/livekit/launch`` and ``python -m server.livekit``: validation, the operator token, the
bounded count, and a worker process's life (a LiveKit URL nobody answers → the worker
reports a connection error and the route shows it failed). The worker needs its own
environment (integrations/livekit/.venv: livekit's protobuf cannot live beside mediapipe's);
without one the tests that run it skip and say so, and the route's clear error is tested."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.access import access_middleware
from server.errors import error_middleware
from server.livekit import worker_python
from server.livekit.launch import AvatarLauncher, setup_livekit

WORKER = worker_python()
needs_worker = pytest.mark.skipif(
    WORKER is None, reason="no LiveKit worker environment (integrations/livekit/.venv or LIPSYNC_LIVEKIT_PYTHON): "
    "livekit needs protobuf >= 5, this project's mediapipe < 5, so ./run.sh test does not install it")
DEAD_URL = "ws://127.0.0.1:9"  # nothing listens there: the worker's connect is refused at once


async def make_client(launcher: AvatarLauncher, token: str | None = None) -> TestClient[Any, Any]:
    app = web.Application(middlewares=[error_middleware, access_middleware(token, [])])
    setup_livekit(app, launcher)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    c = await make_client(AvatarLauncher("http://127.0.0.1:1", max_avatars=2))
    yield c
    await c.close()


async def test_launch_validates_its_fields(client: TestClient[Any, Any]) -> None:
    for body, code in [({}, 1002), ({"livekit_url": "wss://x"}, 1002), ({"livekit_url": "ftp://x", "token": "t"}, 1003),
                       ({"livekit_url": 5, "token": "t"}, 1003), ({"livekit_url": "wss://x", "token": "t", "room": ["r"]}, 1003)]:
        response = await client.post("/livekit/launch", json=body)
        assert response.status == 400, body
        assert (await response.json())["code"] == code
    assert (await client.get("/livekit/avatars/nope")).status == 404
    assert (await client.delete("/livekit/avatars/nope")).status == 404
    listing = await (await client.get("/livekit/avatars")).json()
    assert listing["data"] == {"avatars": [], "alive": 0, "max": 2}


async def test_launch_without_the_worker_says_how_to_install_it() -> None:
    c = await make_client(AvatarLauncher("http://127.0.0.1:1", python="/nonexistent/python"))
    try:
        response = await c.post("/livekit/launch", json={"livekit_url": "wss://x", "token": "t"})
        assert response.status == 503
        body = await response.json()
        assert body["code"] == 1302 and "pip install -e integrations/livekit" in body["msg"]
    finally:
        await c.close()


async def test_launch_needs_the_operator_token_when_one_is_configured() -> None:
    c = await make_client(AvatarLauncher("http://127.0.0.1:1", python="/nonexistent/python"), token="op")
    try:
        assert (await c.post("/livekit/launch", json={"livekit_url": "wss://x", "token": "t"})).status == 401
        assert (await c.get("/livekit/avatars", headers={"Authorization": "Bearer wrong"})).status == 403
        assert (await c.get("/livekit/avatars", headers={"Authorization": "Bearer op"})).status == 200
    finally:
        await c.close()


async def wait_state(client: TestClient[Any, Any], avatar_id: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data: dict[str, Any] = (await (await client.get(f"/livekit/avatars/{avatar_id}")).json())["data"]
        # a final state is reported before the process exits: wait for its exit status too
        final = data["state"] not in ("failed", "ended") or data["exit_code"] is not None
        if (data["state"] in states and final) or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.1)


@needs_worker
async def test_a_worker_that_cannot_reach_livekit_shows_failed(client: TestClient[Any, Any]) -> None:
    response = await client.post("/livekit/launch", json={"livekit_url": DEAD_URL, "token": "not-a-jwt", "room": "r1"})
    assert response.status == 200
    launched = (await response.json())["data"]
    assert launched["state"] == "starting" and launched["room"] == "r1"
    data = await wait_state(client, launched["id"], {"failed", "ended"})
    assert data["state"] == "failed" and data["exit_code"] == 1
    assert "cannot join the room" in data["error"] and "Connection refused" in data["error"]
    listing = (await (await client.get("/livekit/avatars")).json())["data"]
    assert listing["alive"] == 0 and [a["id"] for a in listing["avatars"]] == [launched["id"]]


async def test_a_python_without_the_worker_shows_failed() -> None:
    launcher = AvatarLauncher("http://127.0.0.1:1", python=sys.executable)  # the server's: no lipsync_livekit in it
    c = await make_client(launcher)
    try:
        first = (await (await c.post("/livekit/launch", json={"livekit_url": DEAD_URL, "token": "t"})).json())["data"]
        data = await wait_state(c, first["id"], {"failed", "ended"})
        assert data["state"] == "failed" and "lipsync_livekit" in data["error"]
    finally:
        await c.close()


STAND_IN = """
import json, signal, sys, time
print(json.dumps({"state": "running", "room": "from-token"}), flush=True)
signal.signal(signal.SIGINT, lambda *_: (print(json.dumps({"state": "ended"}), flush=True), sys.exit(0)))
time.sleep(60)
"""


async def test_the_count_is_bounded_and_delete_stops_an_avatar(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stand_in_worker.py").write_text(STAND_IN)  # a worker that stays in its room until stopped
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    launcher = AvatarLauncher("http://127.0.0.1:1", python=sys.executable, max_avatars=1, module="stand_in_worker")
    c = await make_client(launcher)
    try:
        ok1 = await c.post("/livekit/launch", json={"livekit_url": DEAD_URL, "token": "t"})
        assert ok1.status == 200
        first = (await ok1.json())["data"]["id"]
        assert (await wait_state(c, first, {"running"}))["room"] == "from-token"
        refused = await c.post("/livekit/launch", json={"livekit_url": DEAD_URL, "token": "t"})
        assert refused.status == 429 and (await refused.json())["code"] == 1429
        stopped = await c.delete(f"/livekit/avatars/{first}")
        assert stopped.status == 200
        data = (await stopped.json())["data"]
        assert data["state"] == "stopped" and data["exit_code"] == 0
        assert launcher.alive() == []
        assert (await c.post("/livekit/launch", json={"livekit_url": DEAD_URL, "token": "t"})).status == 200
    finally:
        await c.close()  # the app's cleanup stops what is still running


def test_module_without_the_worker_says_how_to_install_it() -> None:
    done = subprocess.run([sys.executable, "-m", "server.livekit", "--url", DEAD_URL, "--token", "t"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "", "LIPSYNC_LIVEKIT_PYTHON": "/nonexistent/python"})
    assert done.returncode == 2 and "pip install -e integrations/livekit" in done.stderr


@needs_worker
def test_module_hands_over_to_the_worker() -> None:
    done = subprocess.run([sys.executable, "-m", "server.livekit", "--url", DEAD_URL, "--token", "t", "--connect-timeout", "10"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and '"state": "failed"' in done.stdout
