"""The avatar worker: joins a LiveKit room as the agent's avatar, takes the agent's speech
from livekit-agents' ``DataStreamAudioReceiver`` (``lk.audio_stream`` byte streams and the
``lk.clear_buffer`` RPC), has a lip-sync server render it, and publishes ``avatar_video`` and
``avatar_audio`` through an ``rtc.AVSynchronizer``.

It speaks LiveKit's avatar protocol by hand rather than through ``AvatarRunner``: the
runner counts ``playback_position`` from the audio frames it pushes, but the server sends
audio all the time (silence while idle), so its count would be wrong; the server knows
exactly when a segment's first and last frames went out and says so in its
``playback_started``/``playback_finished`` events, which are forwarded to the agent as
``lk.playback_started``/``lk.playback_finished``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import av
import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import AudioReceiver, AudioSegmentEnd, DataStreamAudioReceiver
from livekit.agents.voice.room_io import ATTRIBUTE_PUBLISH_ON_BEHALF

from lipsync_livekit.server_client import ServerSession

log = logging.getLogger(__name__)

AUDIO_RATE = 48_000  # what the server's WebRTC audio decodes to (Opus)
AUDIO_CHANNELS = 1
VIDEO_FPS = 25.0  # the server's frame rate: every frame carries 40 ms of audio
QUEUE_MS = 100  # the synchroniser's and the audio source's queue: small, for latency


class AvatarServer(Protocol):
    """What the bridge needs of the lip-sync server (``ServerSession``; tests pass others)."""

    async def send_pcm(self, pcm: bytes, sample_rate: int, channels: int) -> None: ...
    async def end_segment(self) -> None: ...
    async def clear_buffer(self) -> None: ...
    def events(self) -> Any: ...  # an async iterator of the server's event dicts


def video_frame(frame: av.VideoFrame) -> rtc.VideoFrame:
    """An aiortc (PyAV) frame as LiveKit's: I420 planes as they lie, no colour conversion."""
    if frame.format.name != "yuv420p" or frame.width % 2 or frame.height % 2:
        frame = frame.reformat(width=frame.width - frame.width % 2, height=frame.height - frame.height % 2, format="yuv420p")
    planes = frame.to_ndarray()  # yuv420p: Y, then U, then V, rows of width / 2 packed two to a row
    return rtc.VideoFrame(frame.width, frame.height, rtc.VideoBufferType.I420, planes.tobytes())


@dataclass
class AudioConverter:
    """aiortc's decoded audio (48 kHz, stereo or mono) as LiveKit frames at the source's format."""

    sample_rate: int = AUDIO_RATE
    channels: int = AUDIO_CHANNELS
    _resampler: av.AudioResampler | None = None

    def __call__(self, frame: av.AudioFrame) -> list[rtc.AudioFrame]:
        if self._resampler is None:
            layout = "mono" if self.channels == 1 else "stereo"
            self._resampler = av.AudioResampler(format="s16", layout=layout, rate=self.sample_rate)
        out = []
        for piece in self._resampler.resample(frame):
            pcm = piece.to_ndarray().astype(np.int16, copy=False).tobytes()
            out.append(rtc.AudioFrame(pcm, self.sample_rate, self.channels, piece.samples))
        return out


@dataclass
class AvatarBridge:
    """Agent audio in (from a LiveKit ``AudioReceiver``) → the server; the server's frames →
    an ``AVSynchronizer``; the server's playback events → the agent's RPCs."""

    receiver: AudioReceiver
    server: AvatarServer
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    segments: int = 0  # segments sent to the server (for logs and tests)
    _sending: bool = False  # PCM of a segment has gone to the server and its end not yet

    async def start(self) -> None:
        self.receiver.on("clear_buffer", self._on_clear_buffer)
        self._tasks = [asyncio.create_task(self._audio_in(), name="agent audio → server"),
                       asyncio.create_task(self._events(), name="server events → agent")]

    async def _audio_in(self) -> None:
        async for frame in self.receiver:
            if isinstance(frame, AudioSegmentEnd):
                # The receiver also ends a cleared segment; the server has dropped it already,
                # and an end_of_segment then would close the agent's next one early.
                if self._sending:
                    await self.server.end_segment()
                    self.segments += 1
                self._sending = False
                continue
            self._sending = True
            await self.server.send_pcm(bytes(frame.data), frame.sample_rate, frame.num_channels)

    def _on_clear_buffer(self) -> None:
        self._sending = False
        # The receiver has already dropped what it held; the server drops the rest and answers
        # playback_finished {interrupted: true}, which _events forwards.
        self._spawn(self.server.clear_buffer())

    async def _events(self) -> None:
        async for event in self.server.events():
            kind = event.get("event")
            if kind == "playback_started":
                self._notify(self.receiver.notify_playback_started())
            elif kind == "playback_finished":
                position = float(event.get("playback_position") or 0.0)
                interrupted = bool(event.get("interrupted"))
                log.info("segment %s finished at %.2f s%s", event.get("segment"), position, " (interrupted)" if interrupted else "")
                self._notify(self.receiver.notify_playback_finished(playback_position=position, interrupted=interrupted))
            elif kind == "error":
                log.warning("the lip-sync server reported: %s", event.get("msg") or event)

    def _notify(self, result: Awaitable[None] | None) -> None:
        if result is not None:  # the receiver's notify_* may be plain or coroutines
            self._spawn(result)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("forwarding to the agent or the server failed")

        task = asyncio.create_task(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def wait(self) -> None:
        """Until the agent's audio or the server's events end (the first to)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def aclose(self) -> None:
        self.receiver.off("clear_buffer", self._on_clear_buffer)
        for task in [*self._tasks, *self._pending]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._pending, return_exceptions=True)


@dataclass
class Publisher:
    """The server's video and audio into LiveKit sources through one ``AVSynchronizer``."""

    width: int
    height: int
    audio_source: rtc.AudioSource = field(init=False)
    video_source: rtc.VideoSource = field(init=False)
    av_sync: rtc.AVSynchronizer = field(init=False)
    convert_audio: AudioConverter = field(default_factory=AudioConverter)
    video_frames: int = 0
    audio_frames: int = 0

    def __post_init__(self) -> None:
        self.audio_source = rtc.AudioSource(AUDIO_RATE, AUDIO_CHANNELS, queue_size_ms=QUEUE_MS)
        self.video_source = rtc.VideoSource(self.width, self.height)
        self.av_sync = rtc.AVSynchronizer(audio_source=self.audio_source, video_source=self.video_source,
                                          video_fps=VIDEO_FPS, video_queue_size_ms=QUEUE_MS)

    async def push_video(self, frame: av.VideoFrame) -> None:
        await self.av_sync.push(video_frame(frame))
        self.video_frames += 1

    async def push_audio(self, frame: av.AudioFrame) -> None:
        for piece in self.convert_audio(frame):
            await self.av_sync.push(piece)
            self.audio_frames += 1

    async def publish(self, room: rtc.Room) -> None:
        audio = rtc.LocalAudioTrack.create_audio_track("avatar_audio", self.audio_source)
        await room.local_participant.publish_track(audio, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        video = rtc.LocalVideoTrack.create_video_track("avatar_video", self.video_source)
        await room.local_participant.publish_track(video, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))

    async def aclose(self) -> None:
        await self.av_sync.aclose()
        await self.audio_source.aclose()
        await self.video_source.aclose()


async def forward(recv: Callable[[], Awaitable[Any]], push: Callable[[Any], Awaitable[None]]) -> None:
    """Frames from an aiortc track into the publisher until the track ends."""
    from aiortc.mediastreams import MediaStreamError

    with contextlib.suppress(MediaStreamError):
        while True:
            await push(await recv())


@dataclass
class WorkerOptions:
    url: str
    token: str
    server_url: str = "http://127.0.0.1:8010"
    server_token: str | None = None
    avatar: str | None = None
    sender_identity: str | None = None  # the agent; default: the token's lk.publish_on_behalf
    connect_timeout_s: float = 20.0


async def run_worker(options: WorkerOptions, report: Callable[..., None]) -> None:
    """Join, render, publish until the room or the server ends. ``report(state, **details)``
    tells whoever started the worker (the launch route reads it) how far it got."""
    room = rtc.Room()
    report("connecting", url=options.url)
    try:
        await asyncio.wait_for(room.connect(options.url, options.token), options.connect_timeout_s)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no connection to the LiveKit server at {options.url} within {options.connect_timeout_s:g} s") from None
    except rtc.ConnectError as exc:
        raise ConnectionError(f"cannot join the room at {options.url}: {exc}") from None
    me = room.local_participant
    agent = options.sender_identity or me.attributes.get(ATTRIBUTE_PUBLISH_ON_BEHALF)
    report("joined", room=room.name, identity=me.identity, agent=agent)
    if not agent:
        log.warning("the token has no %s attribute: taking audio from the first agent to join", ATTRIBUTE_PUBLISH_ON_BEHALF)
    server = ServerSession(options.server_url, options.server_token, options.avatar)
    publisher: Publisher | None = None
    bridge: AvatarBridge | None = None
    disconnected = asyncio.Event()
    room.on("disconnected", lambda *_: disconnected.set())
    try:
        await server.open()
        assert server.video_track is not None and server.audio_track is not None
        first = await server.video_track.recv()  # the avatar's size, for the video source
        assert isinstance(first, av.VideoFrame)
        publisher = Publisher(first.width, first.height)
        await publisher.publish(room)
        await publisher.push_video(first)
        receiver = DataStreamAudioReceiver(room, sender_identity=agent)
        await receiver.start()  # waits for the agent to be in the room
        bridge = AvatarBridge(receiver, server)
        await bridge.start()
        report("running", session=server.session_id, width=first.width, height=first.height)
        pumps = [asyncio.create_task(forward(server.video_track.recv, publisher.push_video)),
                 asyncio.create_task(forward(server.audio_track.recv, publisher.push_audio)),
                 asyncio.create_task(bridge.wait()),
                 asyncio.create_task(disconnected.wait())]
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        if bridge is not None:
            await bridge.aclose()
            await bridge.receiver.aclose()
        if publisher is not None:
            await publisher.aclose()
        await server.close()
        await room.disconnect()
