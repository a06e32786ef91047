"""A Python WebRTC client for the server (aiortc): opens a session, receives and keeps
the avatar's frames and audio with their arrival times, and drives the HTTP API.

The test suite and the benchmark use it as the "client" their figures are measured at;
a Python chatbot backend can use it as is.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)


@dataclass
class ReceivedVideo:
    t: float  # arrival (time.monotonic)
    pts: int
    image: np.ndarray | None  # RGB, kept only when keep_images


@dataclass
class ReceivedAudio:
    t: float
    pts: int
    rate: int
    samples: np.ndarray  # mono float32 in -1..1


@dataclass
class AudioPacket:
    """An audio RTP packet as it arrived, before the receiver's playout buffer."""

    t: float
    pts: int  # RTP timestamp (48 kHz) counted from the first packet, like decoded frames' pts
    rms: float


@dataclass
class VideoPacket:
    """The last RTP packet of a video frame (marker bit) as it arrived: the frame is
    complete on the wire, before aiortc's receiver holds it for the next frame's start."""

    t: float
    pts: int  # 90 kHz, counted from the first packet


@dataclass
class Received:
    video: list[ReceivedVideo] = field(default_factory=list)
    audio: list[ReceivedAudio] = field(default_factory=list)
    audio_packets: list[AudioPacket] = field(default_factory=list)
    video_packets: list[VideoPacket] = field(default_factory=list)


class ApiFailure(RuntimeError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class AvatarClient:
    def __init__(
        self, base_url: str, keep_images: bool = True, image_every: int = 1, tap_packets: bool = False, token: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.secret: str | None = None  # the session's, from /offer
        self.keep_images = keep_images
        self.tap_packets = tap_packets
        self.image_every = max(1, image_every)
        self.pc: RTCPeerConnection | None = None
        self.http: aiohttp.ClientSession | None = None
        self.session_id: str | None = None
        self.received = Received()
        self._tasks: list[asyncio.Task] = []
        self.first_video = asyncio.Event()

    async def __aenter__(self) -> AvatarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def headers(self) -> dict[str, str]:
        """The session's secret, sent with every call that addresses it."""
        return {"X-Session-Secret": self.secret} if self.secret else {}

    async def post(self, path: str, body: dict[str, Any], check: bool = True) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.post(self.base_url + path, json=body, headers=self.headers) as resp:
            data = await resp.json()
            if check and resp.status >= 400:
                raise ApiFailure(resp.status, data)
            return data

    async def connect(self, avatar: str | None = None, timeout: float = 30.0, watch: str | None = None,
                      secret: str | None = None) -> str:
        """Open a session (or, with ``watch``, watch that one with its ``secret``) and wait
        for the first video frame; the session's id."""
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.token}"} if self.token else None)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates: no STUN lookup
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: Any) -> None:
            reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
            self._tasks.append(asyncio.ensure_future(reader))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        body: dict[str, Any] = {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}
        if avatar:
            body["avatar"] = avatar
        if watch is not None:
            body["watch"] = watch
            self.secret = secret
        answer = await self.post("/offer", body)
        self.session_id = answer["sessionid"]
        self.secret = answer.get("secret") or self.secret
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        if self.tap_packets:
            self._tap_audio_packets()
        await asyncio.wait_for(self.first_video.wait(), timeout)
        return self.session_id

    def _tap_audio_packets(self) -> None:
        """Time packets as they arrive, before aiortc's receive buffers: audio packets are
        decoded with our own Opus decoder (aiortc plays them out 80 ms later), and video
        frames are timed by their last packet (aiortc releases a frame only when the next
        one starts, 40 ms later at 25 fps)."""
        import av

        assert self.pc is not None
        receiver = next(r for r in self.pc.getReceivers() if r.track and r.track.kind == "audio")
        decoder = av.CodecContext.create("opus", "r")
        original = receiver._handle_rtp_packet
        packets = self.received.audio_packets

        first: list[int] = []

        async def tapped(packet: Any, arrival_time_ms: int) -> None:
            try:
                if not first:
                    first.append(packet.timestamp)
                pts = (packet.timestamp - first[0]) % (1 << 32)
                pcm = [f.to_ndarray() for f in decoder.decode(av.Packet(packet.payload))]
                samples = np.concatenate([p.reshape(-1) for p in pcm]).astype(np.float32) if pcm else np.zeros(1)
                if np.issubdtype(pcm[0].dtype if pcm else np.float32, np.integer):
                    samples /= 32768.0
                packets.append(AudioPacket(time.monotonic(), pts, float(np.sqrt(np.mean(samples**2)))))
            except Exception:  # a measurement aid must never break reception
                log.debug("audio packet tap failed", exc_info=True)
            await original(packet, arrival_time_ms)

        # aiortc has no hook for raw packets: wrap the receiver's own handler (a measuring aid only)
        setattr(receiver, "_handle_rtp_packet", tapped)  # noqa: B010

        video = next(r for r in self.pc.getReceivers() if r.track and r.track.kind == "video")
        video_original = video._handle_rtp_packet
        video_first: list[int] = []
        frames = self.received.video_packets

        async def video_tapped(packet: Any, arrival_time_ms: int) -> None:
            if not video_first:
                video_first.append(packet.timestamp)
            if packet.marker:
                frames.append(VideoPacket(time.monotonic(), (packet.timestamp - video_first[0]) % (1 << 32)))
            await video_original(packet, arrival_time_ms)

        setattr(video, "_handle_rtp_packet", video_tapped)  # noqa: B010

    async def _read_video(self, track: Any) -> None:
        n = 0
        try:
            while True:
                frame = await track.recv()
                keep = self.keep_images and n % self.image_every == 0
                image = frame.to_ndarray(format="rgb24") if keep else None
                self.received.video.append(ReceivedVideo(time.monotonic(), frame.pts, image))
                n += 1
                self.first_video.set()
        except (MediaStreamError, asyncio.CancelledError):
            pass

    async def _read_audio(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                if frame.format.is_planar:
                    mono = pcm.reshape(channels, -1).mean(axis=0)
                else:
                    mono = pcm.reshape(-1, channels).mean(axis=1)
                if np.issubdtype(pcm.dtype, np.integer):
                    mono = mono / 32768.0
                self.received.audio.append(ReceivedAudio(time.monotonic(), frame.pts, frame.sample_rate, mono.astype(np.float32)))
        except (MediaStreamError, asyncio.CancelledError):
            pass

    # ---- API ----
    async def say(self, text: str, interrupt: bool = False, voice: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"sessionid": self.session_id, "text": text, "type": "echo", "interrupt": interrupt}
        if voice is not None:
            body["voice"] = voice
        return await self.post("/human", body)

    async def chat(self, text: str, interrupt: bool = False, voice: str | None = None) -> dict[str, Any]:
        """Ask the server's chat model; the reply is spoken as it streams (``data.reply`` names
        it in the events)."""
        body: dict[str, Any] = {"sessionid": self.session_id, "text": text, "type": "chat", "interrupt": interrupt}
        if voice is not None:
            body["voice"] = voice
        return await self.post("/human", body)

    async def interrupt(self) -> dict[str, Any]:
        return await self.post("/interrupt_talk", {"sessionid": self.session_id})

    async def is_speaking(self) -> bool:
        return bool((await self.post("/is_speaking", {"sessionid": self.session_id}))["data"])

    async def upload_audio(self, data: bytes, filename: str = "speech.wav", interrupt: bool = False) -> dict[str, Any]:
        assert self.http is not None
        form = aiohttp.FormData()
        form.add_field("sessionid", self.session_id or "")
        form.add_field("interrupt", "true" if interrupt else "false")
        form.add_field("file", data, filename=filename, content_type="application/octet-stream")
        async with self.http.post(self.base_url + "/humanaudio", data=form, headers=self.headers) as resp:
            body = await resp.json()
            if resp.status >= 400:
                raise ApiFailure(resp.status, body)
            return body

    async def events(self) -> EventStream:
        assert self.http is not None
        ws = await self.http.ws_connect(f"{self.base_url}/humanecho?sessionid={self.session_id}", headers=self.headers)
        return EventStream(ws)

    async def sse(self) -> ServerSentEvents:
        """``GET /events``: the session's events, each kept with its arrival time."""
        assert self.http is not None
        response = await self.http.get(f"{self.base_url}/events", params={"sessionid": self.session_id or ""},
                                       headers=self.headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        if response.status != 200:
            body = await response.json()
            response.release()
            raise ApiFailure(response.status, body)
        return ServerSentEvents(response).start()

    async def wait_speaking(self, value: bool, timeout: float = 20.0, poll: float = 0.02) -> float:
        """Poll /is_speaking until it equals ``value``; returns the time it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.is_speaking() == value:
                return time.monotonic()
            await asyncio.sleep(poll)
        raise TimeoutError(f"is_speaking did not become {value} within {timeout} s")

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()


class EventStream:
    """The /humanecho WebSocket: send text, read JSON events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.ws = ws

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)

    async def send_json(self, body: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(body))

    async def next(self, timeout: float = 10.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"websocket closed ({msg.type})")
        return json.loads(msg.data)

    async def until(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event!r} event within {timeout} s")
            got = await self.next(left)
            if got.get("event") == event:
                return got

    async def close(self) -> None:
        await self.ws.close()


@dataclass
class ArrivedEvent:
    t: float  # arrival (time.monotonic)
    kind: str
    data: dict[str, Any]


class ServerSentEvents:
    """``GET /events`` read as it arrives: ``events`` holds every event with its arrival time,
    ``comments`` the comment lines (heartbeats)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[ArrivedEvent] = []
        self.comments: list[str] = []
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ServerSentEvents:
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        kind, data = "message", []
        try:
            async for raw in self.response.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line and data:
                    self.events.append(ArrivedEvent(time.monotonic(), kind, json.loads("\n".join(data))))
                    kind, data = "message", []
                self._changed.set()
        except (aiohttp.ClientError, asyncio.CancelledError):
            pass
        finally:
            self.ended.set()
            self._changed.set()

    def of(self, kind: str) -> list[ArrivedEvent]:
        return [e for e in self.events if e.kind == kind]

    async def until(self, predicate: Any, timeout: float = 10.0) -> ArrivedEvent:
        """The first event (already here or still to come) for which ``predicate(event)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()  # before looking: what arrives after the look wakes the wait
            for event in self.events:
                if predicate(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or self.ended.is_set():
                raise TimeoutError(f"no such event within {timeout} s (got {[e.kind for e in self.events]})")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.response.close()
