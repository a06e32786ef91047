"""The lip-sync server as the worker sees it: one session opened with ``POST /offer``
(WebRTC, receive-only: the avatar's video and audio come back over aiortc) and driven
through the streamed-audio WebSocket ``GET /audio_stream``.

The WebSocket contract (the server's, kept in LiveKit's avatar terms):
client → server ``{"type": "format", "sample_rate": R, "channels": C}``, binary s16le PCM,
``{"type": "end_of_segment"}``, ``{"type": "clear_buffer"}``; server → client
``{"event": "playback_started", "segment": id}`` and ``{"event": "playback_finished",
"segment": id, "playback_position": s, "interrupted": bool}``.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The lip-sync server refused or could not be reached; the message says which and why."""


@dataclass
class ServerSession:
    """One avatar session on a running lip-sync server."""

    base_url: str
    token: str | None = None  # the server's operator token, when it has one
    avatar: str | None = None
    open_timeout_s: float = 20.0
    session_id: str | None = None
    secret: str | None = None
    video_track: MediaStreamTrack | None = None
    audio_track: MediaStreamTrack | None = None
    _http: aiohttp.ClientSession | None = None
    _pc: RTCPeerConnection | None = None
    _ws: aiohttp.ClientWebSocketResponse[bool] | None = None
    _format: tuple[int, int] | None = None
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def open(self) -> None:
        """Open the session and its streamed-audio WebSocket; the tracks arrive with it."""
        self._http = aiohttp.ClientSession(headers=self.headers)
        pc = self._pc = RTCPeerConnection()
        tracks: dict[str, MediaStreamTrack] = {}
        both = asyncio.Event()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            tracks[track.kind] = track
            if {"video", "audio"} <= tracks.keys():
                both.set()

        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before it returns
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        if self.avatar:
            body["avatar"] = self.avatar
        answer = await self._post("/offer", body)
        self.session_id, self.secret = str(answer["sessionid"]), answer.get("secret")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        try:
            await asyncio.wait_for(both.wait(), self.open_timeout_s)
        except asyncio.TimeoutError:
            raise ServerError(f"the server's session {self.session_id} sent no video and audio tracks "
                              f"within {self.open_timeout_s:g} s") from None
        self.video_track, self.audio_track = tracks["video"], tracks["audio"]
        await self.connect_audio_stream()
        log.info("lip-sync session %s open on %s", self.session_id, self.base_url)

    async def connect_audio_stream(self) -> None:
        """The session's streamed-audio WebSocket (``open`` calls it once the tracks are there)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self.headers)
        params = {"sessionid": self.session_id or "", **({"secret": self.secret} if self.secret else {})}
        try:
            self._ws = await self._http.ws_connect(f"{self.base_url}/audio_stream", params=params, heartbeat=20)
        except aiohttp.WSServerHandshakeError as exc:
            raise ServerError(f"the server refused its streamed-audio WebSocket (/audio_stream): {exc.status} {exc.message}; "
                              "is it a version with the streamed-audio route?") from None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._http is not None
        try:
            async with self._http.post(f"{self.base_url}{path}", json=body) as response:
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as exc:
            raise ServerError(f"cannot reach the lip-sync server at {self.base_url}: {exc}") from None
        if response.status >= 400:
            msg = payload.get("msg") if isinstance(payload, dict) else payload
            raise ServerError(f"the lip-sync server answered {path} with {response.status}: {msg}")
        return dict(payload)  # /offer answers sdp, type, sessionid, secret at the top level

    async def send_pcm(self, pcm: bytes, sample_rate: int, channels: int) -> None:
        """Stream a piece of s16le PCM, declaring the format when it changes."""
        async with self._send_lock:  # a format message and its PCM must not interleave with another sender
            ws = self._require_ws()
            if self._format != (sample_rate, channels):
                await ws.send_str(json.dumps({"type": "format", "sample_rate": sample_rate, "channels": channels}))
                self._format = (sample_rate, channels)
            await ws.send_bytes(pcm)

    async def end_segment(self) -> None:
        async with self._send_lock:
            await self._require_ws().send_str(json.dumps({"type": "end_of_segment"}))

    async def clear_buffer(self) -> None:
        async with self._send_lock:
            await self._require_ws().send_str(json.dumps({"type": "clear_buffer"}))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The server's events until the WebSocket closes."""
        ws = self._require_ws()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                try:
                    event = json.loads(message.data)
                except ValueError:
                    log.warning("the server sent a message that is not JSON: %.80s", message.data)
                    continue
                if isinstance(event, dict):
                    yield event
            elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                break

    def _require_ws(self) -> aiohttp.ClientWebSocketResponse[bool]:
        if self._ws is None or self._ws.closed:
            raise ServerError("the streamed-audio WebSocket to the lip-sync server is not open")
        return self._ws

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._pc is not None:
            await self._pc.close()
        if self._http is not None:
            await self._http.close()
