"""The peers watching a session: one session, several viewers.

``POST /offer`` with ``watch`` answers a receive-only peer whose tracks read the watched
session's player. The player decides each 40 ms frame once, whoever asks first, so every
viewer gets the frames the session's own peer gets: nothing is rendered again and the
worker does no more work (each peer still encodes for itself, as its bandwidth needs).

A viewer's end (its peer closes, fails, never connects, or goes silent) closes that viewer
only; the session's close closes all of its viewers. At most ``limit`` per session.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamTrack

from server.errors import TooManyRequests
from server.peer import answer, close_if_never_connected, close_if_peer_vanishes, new_peer
from server.player import SessionPlayer
from server.tracks import AvatarAudioTrack, AvatarVideoTrack

log = logging.getLogger(__name__)


@dataclass
class Viewer:
    id: str
    pc: RTCPeerConnection
    inbound: MediaBlackhole
    address: str | None = None
    closed: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def connected(self) -> bool:
        return self.pc.connectionState == "connected"


class Viewers:
    """The viewers of one session."""

    def __init__(self, session_id: str, player: SessionPlayer, limit: int) -> None:
        self.session_id = session_id
        self.player = player
        self.limit = limit
        self._viewers: dict[str, Viewer] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._viewers)

    @property
    def connected(self) -> int:
        return sum(v.connected for v in self._viewers.values())

    async def add(
        self, offer: RTCSessionDescription, ice_servers: list[str], connect_timeout_s: float, client: str | None = None
    ) -> RTCSessionDescription:
        """Answer a viewer's offer (TooManyRequests past the limit; ValueError and friends from
        aiortc when the offer cannot be answered, with nothing left behind)."""
        if self.closed:
            raise ValueError("the session is closing")
        if len(self._viewers) >= self.limit:
            raise TooManyRequests(
                f"session {self.session_id!r} already has {len(self._viewers)} viewers (at most {self.limit}): "
                "close one, or raise --max-viewers"
            )
        viewer = Viewer(secrets.token_hex(4), new_peer(ice_servers), MediaBlackhole(), client)
        self._viewers[viewer.id] = viewer
        label = f"session {self.session_id} viewer {viewer.id}"

        def alive() -> bool:
            return not viewer.closed

        def gone() -> None:
            self._spawn(self.remove(viewer.id))

        for coro in (close_if_never_connected(viewer.pc, label, connect_timeout_s, alive, gone),
                     close_if_peer_vanishes(viewer.pc, label, alive, gone)):
            task = asyncio.ensure_future(coro)
            viewer.tasks.add(task)
            task.add_done_callback(viewer.tasks.discard)
        # join: start at the frame on air, not at the session's first
        tracks: dict[str, MediaStreamTrack] = {"audio": AvatarAudioTrack(self.player, join=True),
                                               "video": AvatarVideoTrack(self.player, join=True)}
        try:
            answered = await answer(viewer.pc, offer, tracks, viewer.inbound, label, gone)
        except BaseException:
            await self.remove(viewer.id)
            raise
        log.info("%s: watching (%d viewers)", label, len(self._viewers))
        return answered

    async def remove(self, viewer_id: str) -> None:
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is None or viewer.closed:
            return
        viewer.closed = True
        for task in list(viewer.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await viewer.pc.close()
        await viewer.inbound.stop()
        log.info("session %s viewer %s closed (%d viewers)", self.session_id, viewer_id, len(self._viewers))

    async def close(self) -> None:
        """The session is closing: so are its viewers."""
        self.closed = True
        for viewer_id in list(self._viewers):
            await self.remove(viewer_id)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
