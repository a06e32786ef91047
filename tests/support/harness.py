"""The server in one process, for fast tests of sessions, the manager and the routes.

``running_server`` builds the real aiohttp application with a ``FakeWorker`` in place of
the worker process and, by default, ``ToneTTS`` in place of espeak, serves it on a
loopback port through aiohttp's test server, and hands back a ``Harness``: the HTTP
client, the manager, the fake worker, and ``viewer()`` which opens a session and reads its
two tracks the way aiortc's senders do (same clock, same frames, no encoding).
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient, TestServer
from aiortc.mediastreams import MediaStreamError

from avatars.avatar import Avatar, load_avatar, save_avatar
from media.pcm import Pcm, from_float
from media.timing import SAMPLE_RATE
from server.app import create_app
from server.config import ServerConfig
from server.keys import MANAGER
from server.manager import SessionManager
from server.session import Session
from server.tracks import AvatarAudioTrack, AvatarVideoTrack
from tests.support.fake_worker import FakeWorker, colour_of
from tests.support.media_analysis import video_index
from tts.base import TTSBackend, TTSError
from tts.sentences import split_sentences

TINY = "tiny"
TINY_SIZE = 32  # px: frames cost nothing to copy or convert


def tiny_avatar(data_dir: Path) -> Avatar:
    """Eight 32x32 frames, each a different flat level below every fake speaking colour."""
    try:
        return load_avatar(data_dir, TINY)
    except LookupError:
        frames = np.stack([np.full((TINY_SIZE, TINY_SIZE, 3), 10 + 4 * i, np.uint8) for i in range(8)])
        landmarks = np.full((8, 478, 2), np.nan, np.float32)
        return save_avatar(data_dir, TINY, frames, landmarks)


class ToneTTS(TTSBackend):
    """Speech stand-in: each sentence a 220 Hz tone, 50 ms per character, after ``delay_s``.
    ``fail_after`` sentences it raises TTSError, as an unreachable service would."""

    name = "tone"

    def __init__(self, delay_s: float = 0.0, fail_after: int | None = None, ms_per_char: float = 50.0) -> None:
        self.delay_s = delay_s
        self.fail_after = fail_after
        self.ms_per_char = ms_per_char

    def samples_for(self, text: str) -> int:
        return sum(int(len(piece) * self.ms_per_char * SAMPLE_RATE / 1000) for piece in split_sentences(text))

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        for k, piece in enumerate(split_sentences(text)):
            if self.fail_after is not None and k >= self.fail_after:
                raise TTSError("the tone service is down; use another backend")
            await asyncio.sleep(self.delay_s)
            n = int(len(piece) * self.ms_per_char * SAMPLE_RATE / 1000)
            yield from_float(0.3 * np.sin(2 * math.pi * 220 * np.arange(n) / SAMPLE_RATE))


@dataclass
class Viewer:
    """Reads a session's tracks like a peer: every video frame and audio frame, in order."""

    session: Session
    video: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (media frame index, image)
    audio: list[np.ndarray] = field(default_factory=list)  # 20 ms at 48 kHz each
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Viewer:
        video, audio = AvatarVideoTrack(self.session.player), AvatarAudioTrack(self.session.player)
        self._tasks = [asyncio.ensure_future(self._read_video(video)), asyncio.ensure_future(self._read_audio(audio))]
        return self

    async def _read_video(self, track: AvatarVideoTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.video.append((video_index(frame.pts or 0), frame.to_ndarray(format="rgb24")))

    async def _read_audio(self, track: AvatarAudioTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.audio.append(frame.to_ndarray().reshape(-1))

    def levels(self) -> list[int]:
        """The flat level of each video frame received (idle levels are below 60)."""
        return [int(image[0, 0, 0]) for _n, image in self.video]

    def shown(self, utterance_id: str) -> list[int]:
        """Media frame indices that showed ``utterance_id``'s frames (within the I420 round trip's rounding)."""
        level = colour_of(utterance_id)
        return [n for n, image in self.video if abs(int(image[0, 0, 0]) - level) <= 3]

    def speaking(self) -> list[int]:
        """Media frame indices that showed any speaking frame."""
        return [n for n, image in self.video if int(image[0, 0, 0]) >= 60]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclass
class Harness:
    client: TestClient[Any, Any]
    manager: SessionManager
    workers: list[FakeWorker]
    tts: TTSBackend
    viewers: list[Viewer] = field(default_factory=list)

    @property
    def worker(self) -> FakeWorker:
        return self.workers[-1]

    async def viewer(self, avatar: str = TINY) -> Viewer:
        """A new session on ``avatar`` (no WebRTC peer), with its tracks being read."""
        session = await self.manager.create(self.manager.avatar(avatar))
        viewer = Viewer(session).start()
        self.viewers.append(viewer)
        return viewer

    def secret_for(self, session_id: object) -> dict[str, str]:
        """The X-Session-Secret header of the harness's session ``session_id`` (none for others)."""
        for viewer in self.viewers:
            if viewer.session.id == session_id:
                return {"X-Session-Secret": viewer.session.secret}
        return {}

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """POST JSON; a body addressing one of the harness's sessions carries its secret."""
        sent = {**self.secret_for(body.get("sessionid")), **(headers or {})}
        async with self.client.post(path, json=body, headers=sent) as resp:
            return resp.status, await resp.json()

    async def until(self, predicate: Any, timeout: float = 5.0, poll: float = 0.01) -> None:
        """Wait until ``predicate()`` holds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(poll)


@contextlib.asynccontextmanager
async def running_server(
    data_dir: Path,
    tts: TTSBackend | None = None,
    fail_open: bool = False,
    hold_jobs: bool = False,
    open_delay_s: float = 0.0,
    **config: Any,
) -> AsyncIterator[Harness]:
    tiny_avatar(data_dir)
    settings = ServerConfig(data_dir=data_dir, avatar=TINY, **config)
    workers, factory = FakeWorker.factory(fail_open=fail_open, hold_jobs=hold_jobs, open_delay_s=open_delay_s)
    speech = tts or ToneTTS()
    app = create_app(settings, worker_factory=factory, tts=speech)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    harness = Harness(client, app[MANAGER], workers, speech)
    try:
        yield harness
    finally:
        for viewer in harness.viewers:
            await viewer.stop()
        await client.close()

