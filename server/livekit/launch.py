"""``POST /livekit/launch``: start a LiveKit avatar in a room, as avatar vendors' launch
routes do (the agent mints a token for the avatar's identity, with ``lk.publish_on_behalf``
naming itself, and posts it here). Each avatar is a ``lipsync_livekit`` process pointed back
at this server; ``GET /livekit/avatars[/{id}]`` lists them, ``DELETE`` stops one.

A process per avatar rather than a task in the server: the worker needs livekit's
protobuf, which cannot live beside the server's mediapipe, and a crash of one room's
worker then takes nothing else down.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from server.config import ServerConfig
from server.errors import BadRequest, ErrorCode, LipSyncError, ok
from server.livekit import INSTALL_HINT, WORKER_MODULE, worker_python
from server.request import optional_str, read_json

log = logging.getLogger(__name__)

URL_SCHEMES = ("ws://", "wss://", "http://", "https://")
FINISHED_KEPT = 32  # ended avatars listed after they end, so a failure can be read
STOP_GRACE_S = 5.0

routes = web.RouteTableDef()


@dataclass
class LaunchedAvatar:
    id: str
    room: str | None
    livekit_url: str
    avatar: str | None
    process: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    state: str = "starting"  # then what the worker reports: connecting, joined, running; ended or failed
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    watcher: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "room": self.details.get("room") or self.room, "livekit_url": self.livekit_url,
                "avatar": self.avatar, "state": self.state, "error": self.error, "pid": self.process.pid,
                "exit_code": self.exit_code, "started_at": self.started_at,
                **{k: v for k, v in self.details.items() if k in ("identity", "agent", "session")}}


@dataclass
class AvatarLauncher:
    """The avatars this server started: at most ``max_avatars`` alive at once."""

    server_url: str
    server_token: str | None = None
    python: str | None = None  # the worker's Python; None: look for it (server.livekit.worker_python)
    max_avatars: int = 4
    module: str = WORKER_MODULE  # what ``python -m`` runs (tests run a stand-in)
    avatars: dict[str, LaunchedAvatar] = field(default_factory=dict)

    def alive(self) -> list[LaunchedAvatar]:
        return [a for a in self.avatars.values() if a.alive]

    async def launch(self, livekit_url: str, token: str, room: str | None, avatar: str | None) -> LaunchedAvatar:
        python = worker_python(self.python)
        if python is None:
            raise LipSyncError(INSTALL_HINT, ErrorCode.WORKER_UNAVAILABLE)
        if len(self.alive()) >= self.max_avatars:
            raise LipSyncError(f"this machine already runs {self.max_avatars} LiveKit avatars (LIPSYNC_LIVEKIT_MAX_AVATARS); "
                               "stop one (DELETE /livekit/avatars/ID) or launch on another machine", ErrorCode.TOO_MANY_REQUESTS)
        args = ["-m", self.module, "--url", livekit_url, "--server", self.server_url]
        if room:
            args += ["--room", room]
        if avatar:
            args += ["--avatar", avatar]
        # Tokens through the environment: argv is readable by every user of the machine (ps).
        env = {**os.environ, "LIVEKIT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        env.pop("LIPSYNC_TOKEN", None)
        if self.server_token:
            env["LIPSYNC_TOKEN"] = self.server_token
        process = await asyncio.create_subprocess_exec(python, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                       start_new_session=True)  # its own group: a stop reaches its children
        launched = LaunchedAvatar(secrets.token_hex(6), room, livekit_url, avatar, process)
        launched.watcher = asyncio.create_task(self._watch(launched))
        self.avatars[launched.id] = launched
        self._prune()
        log.info("LiveKit avatar %s started (pid %d, room %s)", launched.id, process.pid, room or "from the token")
        return launched

    async def _watch(self, launched: LaunchedAvatar) -> None:
        process = launched.process
        assert process.stdout is not None and process.stderr is not None

        async def states() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                try:
                    report = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(report, dict) and isinstance(report.get("state"), str):
                    launched.state = report.pop("state")
                    launched.error = report.pop("error", launched.error)
                    launched.details.update(report)

        async def errors() -> None:
            assert process.stderr is not None
            async for raw in process.stderr:  # read all of it: a full pipe would stall the worker
                launched.stderr_tail.append(raw.decode(errors="replace").rstrip())

        await asyncio.gather(states(), errors())
        launched.exit_code = await process.wait()
        if launched.state not in ("ended", "failed"):
            launched.state = "ended" if launched.exit_code == 0 else "failed"
        if launched.state == "failed" and not launched.error:
            launched.error = (launched.stderr_tail[-1] if launched.stderr_tail else None) or f"exit status {launched.exit_code}"
        log.info("LiveKit avatar %s %s (exit %s)%s", launched.id, launched.state, launched.exit_code,
                 f": {launched.error}" if launched.error else "")

    def _prune(self) -> None:
        finished = [a for a in self.avatars.values() if not a.alive]
        for old in finished[:max(0, len(finished) - FINISHED_KEPT)]:
            del self.avatars[old.id]

    def get(self, avatar_id: str) -> LaunchedAvatar:
        found = self.avatars.get(avatar_id)
        if found is None:
            raise LipSyncError(f"no LiveKit avatar {avatar_id!r}: GET /livekit/avatars lists them", ErrorCode.NOT_FOUND)
        return found

    async def stop(self, launched: LaunchedAvatar) -> None:
        was_alive = launched.alive
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launched.process.pid, signal.SIGINT)  # the worker leaves the room cleanly on SIGINT
            try:
                await asyncio.wait_for(asyncio.shield(launched.process.wait()), STOP_GRACE_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launched.process.pid, signal.SIGKILL)
        if launched.watcher is not None:
            await launched.watcher
        if was_alive:
            launched.state = "stopped"

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(a) for a in self.avatars.values()), return_exceptions=True)


LAUNCHER = web.AppKey("livekit_launcher", AvatarLauncher)


def launcher_for(config: ServerConfig) -> AvatarLauncher:
    """The server's launcher: workers reach this server on its own port, over loopback when it
    listens on every interface. ``LIPSYNC_LIVEKIT_MAX_AVATARS`` bounds them (default 4)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    host = f"[{host}]" if ":" in host else host
    try:
        most = max(1, int(os.environ.get("LIPSYNC_LIVEKIT_MAX_AVATARS", "4")))
    except ValueError:
        raise ValueError("LIPSYNC_LIVEKIT_MAX_AVATARS must be a whole number") from None
    return AvatarLauncher(f"http://{host}:{config.port}", config.token, max_avatars=most)


def setup_livekit(app: web.Application, launcher: AvatarLauncher) -> None:
    app[LAUNCHER] = launcher
    app.add_routes(routes)

    async def cleanup(app: web.Application) -> None:
        await app[LAUNCHER].close()

    app.on_cleanup.append(cleanup)


@routes.post("/livekit/launch")
async def launch(request: web.Request) -> web.Response:
    body = await read_json(request)
    url = optional_str(body, "livekit_url", max_len=2048)
    token = optional_str(body, "token", max_len=16_384)
    if not url:
        raise LipSyncError("field 'livekit_url' is required: the LiveKit server's URL (wss://...)", ErrorCode.MISSING_FIELD)
    if not url.startswith(URL_SCHEMES):
        raise BadRequest(f"field 'livekit_url' must be a ws://, wss://, http:// or https:// URL, got {url[:80]!r}")
    if not token:
        raise LipSyncError("field 'token' is required: a LiveKit token for the avatar's identity, with the attribute "
                           "lk.publish_on_behalf naming the agent", ErrorCode.MISSING_FIELD)
    room = optional_str(body, "room", max_len=256)
    avatar = optional_str(body, "avatar", max_len=128)
    launched = await request.app[LAUNCHER].launch(url, token, room, avatar)
    return ok(launched.describe())


@routes.get("/livekit/avatars")
async def list_avatars(request: web.Request) -> web.Response:
    launcher = request.app[LAUNCHER]
    return ok({"avatars": [a.describe() for a in launcher.avatars.values()], "alive": len(launcher.alive()),
               "max": launcher.max_avatars})


@routes.get("/livekit/avatars/{id}")
async def get_avatar(request: web.Request) -> web.Response:
    return ok(request.app[LAUNCHER].get(request.match_info["id"]).describe())


@routes.delete("/livekit/avatars/{id}")
async def stop_avatar(request: web.Request) -> web.Response:
    launcher = request.app[LAUNCHER]
    launched = launcher.get(request.match_info["id"])
    await launcher.stop(launched)
    return ok(launched.describe())
