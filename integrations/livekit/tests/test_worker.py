"""The avatar worker up to the network, with livekit's real objects: livekit-agents'
``DataStreamAudioReceiver`` fed the byte stream and RPC payloads LiveKit delivers (the
room, its participant and the reader are stand-ins: a LiveKit server is a Go binary this
suite cannot start), the bridge talking the ``/audio_stream`` contract to a WebSocket
server, and the real ``rtc.AudioSource``/``VideoSource``/``AVSynchronizer``."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioReceiver

from lipsync_livekit.server_client import ServerSession
from lipsync_livekit.worker import AudioConverter, AvatarBridge, Publisher, video_frame

AGENT = "agent-1"


@dataclass
class Participant:
    identity: str
    kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalParticipant(Participant):
    _rpc_handlers: dict[str, Any] = field(default_factory=dict)
    rpcs: list[tuple[str, str, str]] = field(default_factory=list)

    def register_rpc_method(self, method: str, handler: Any) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str, **_: Any) -> str:
        self.rpcs.append((destination_identity, method, payload))
        return "ok"


@dataclass
class Room:
    """What ``DataStreamAudioReceiver`` touches of ``rtc.Room``."""

    local_participant: LocalParticipant = field(default_factory=lambda: LocalParticipant("avatar", attributes={
        "lk.publish_on_behalf": AGENT}))
    remote_participants: dict[str, Participant] = field(default_factory=lambda: {AGENT: Participant(AGENT)})
    stream_handlers: dict[str, Any] = field(default_factory=dict)

    def isconnected(self) -> bool:
        return True

    def on(self, *_: Any) -> None: ...
    def off(self, *_: Any) -> None: ...

    def register_byte_stream_handler(self, topic: str, handler: Any) -> None:
        self.stream_handlers[topic] = handler


@dataclass
class Info:
    stream_id: str
    attributes: dict[str, str]


class Reader:
    """A byte stream as LiveKit hands one over: ``info`` with the sender's attributes, then chunks."""

    def __init__(self, stream_id: str, sample_rate: int, channels: int) -> None:
        self.info = Info(stream_id, {"sample_rate": str(sample_rate), "num_channels": str(channels)})
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    def __aiter__(self) -> Reader:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.chunks.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


@dataclass
class FakeServer:
    """The lip-sync server's /audio_stream route as its contract says it behaves."""

    received: dict[int, bytearray] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    format: tuple[int, int] | None = None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        assert request.query["sessionid"] == "s1" and request.query["secret"] == "sec"
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        segment = 1
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                if segment not in self.received:
                    self.received[segment] = bytearray()
                    await ws.send_json({"event": "playback_started", "segment": segment})
                self.received[segment] += msg.data
                continue
            message = json.loads(msg.data)
            self.messages.append(message)
            if message["type"] == "format":
                self.format = (message["sample_rate"], message["channels"])
            elif message["type"] in ("end_of_segment", "clear_buffer") and segment in self.received:
                assert self.format is not None
                seconds = len(self.received[segment]) / 2 / self.format[1] / self.format[0]
                await ws.send_json({"event": "playback_finished", "segment": segment, "playback_position": seconds,
                                    "interrupted": message["type"] == "clear_buffer"})
                segment += 1
        return ws


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_agent_audio_reaches_the_server_and_playback_events_reach_the_agent() -> None:
    fake = FakeServer()
    app = web.Application()
    app.router.add_get("/audio_stream", fake.handle)
    async with TestServer(app) as http:
        room = Room()
        receiver = DataStreamAudioReceiver(room, sender_identity=AGENT)  # type: ignore[arg-type]
        await receiver.start()
        server = ServerSession(str(http.make_url("")).rstrip("/"), session_id="s1", secret="sec")
        await server.connect_audio_stream()
        bridge = AvatarBridge(receiver, server)
        await bridge.start()
        handler = room.stream_handlers["lk.audio_stream"]
        rpcs = room.local_participant.rpcs
        try:
            # Segment 1: 0.5 s of 24 kHz speech in 20 ms pieces, as DataStreamAudioOutput writes them.
            pcm = (np.sin(np.arange(12_000) / 10) * 8000).astype("<i2").tobytes()
            reader = Reader("AUDIO_1", 24_000, 1)
            handler(reader, AGENT)
            for i in range(0, len(pcm), 960):
                reader.chunks.put_nowait(pcm[i:i + 960])
            reader.chunks.put_nowait(None)  # the trailer: end of segment
            await wait_for(lambda: any(m == "lk.playback_finished" for _, m, _ in rpcs))
            assert bytes(fake.received[1]) == pcm  # whole and in order
            assert fake.format == (24_000, 1)
            assert [m["type"] for m in fake.messages] == ["format", "end_of_segment"]
            started = [r for r in rpcs if r[1] == "lk.playback_started"]
            assert started == [(AGENT, "lk.playback_started", "")]
            finished = [json.loads(p) for _, m, p in rpcs if m == "lk.playback_finished"]
            assert len(finished) == 1  # livekit-agents' PlaybackFinishedEvent, as the agent's handler parses it
            assert finished[0]["playback_position"] == pytest.approx(0.5) and finished[0]["interrupted"] is False

            # Segment 2 is interrupted: lk.clear_buffer arrives as LiveKit delivers the RPC.
            reader2 = Reader("AUDIO_2", 24_000, 1)
            handler(reader2, AGENT)
            reader2.chunks.put_nowait(pcm[:4800 * 2])  # 0.2 s, more than one 100 ms receiver frame
            await wait_for(lambda: 2 in fake.received)
            answer = DataStreamAudioReceiver._clear_buffer_rpc_handler(rtc.RpcInvocationData(
                request_id="r1", caller_identity=AGENT, payload="", response_timeout=5.0, method="lk.clear_buffer"))
            assert answer == "ok"
            await wait_for(lambda: len([r for r in rpcs if r[1] == "lk.playback_finished"]) == 2)
            last = json.loads([p for _, m, p in rpcs if m == "lk.playback_finished"][-1])
            assert last["interrupted"] is True and 0 < last["playback_position"] <= 0.2 + 1e-6
            assert fake.messages[-1] == {"type": "clear_buffer"}
            reader2.chunks.put_nowait(None)  # the rest of the cleared segment is dropped, no end_of_segment sent
            await asyncio.sleep(0.2)
            assert [m["type"] for m in fake.messages].count("end_of_segment") == 1

            # A caller that is not the agent is refused, as LiveKit's handler does.
            refused = DataStreamAudioReceiver._clear_buffer_rpc_handler(rtc.RpcInvocationData(
                request_id="r2", caller_identity="someone-else", payload="", response_timeout=5.0, method="lk.clear_buffer"))
            assert refused == "reject"
        finally:
            await bridge.aclose()
            await receiver.aclose()
            await server.close()


def test_frames_convert_losslessly() -> None:
    rng = np.random.default_rng(1)
    planes = rng.integers(0, 255, (48 * 3 // 2, 64), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
    converted = video_frame(frame)
    assert (converted.width, converted.height, converted.type) == (64, 48, rtc.VideoBufferType.I420)
    assert bytes(converted.data) == planes.tobytes()

    # aiortc's Opus decoder gives 48 kHz stereo s16 frames of 20 ms
    stereo = np.repeat((np.arange(960) * 30).astype(np.int16), 2).reshape(1, -1)
    audio = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
    audio.sample_rate = 48_000
    out = AudioConverter()(audio)
    got = np.frombuffer(b"".join(bytes(f.data) for f in out), np.int16)
    assert all(f.sample_rate == 48_000 and f.num_channels == 1 for f in out)
    assert abs(len(got) - 960) <= 32 and np.abs(got[:900].astype(int) - (np.arange(900) * 30)).max() <= 1


async def test_publisher_feeds_livekits_sources_through_the_synchroniser() -> None:
    publisher = Publisher(64, 48)
    try:
        t0 = time.monotonic()
        for i in range(10):  # 0.4 s of the server's output: a frame and its 40 ms of audio, twice 20 ms
            planes = np.full((72, 64), i * 20, np.uint8)
            await publisher.push_video(av.VideoFrame.from_ndarray(planes, format="yuv420p"))
            for _ in range(2):
                a = av.AudioFrame.from_ndarray(np.zeros((1, 1920), np.int16), format="s16", layout="stereo")
                a.sample_rate = 48_000
                await publisher.push_audio(a)
        elapsed = time.monotonic() - t0
        assert publisher.video_frames == 10 and publisher.audio_frames >= 19
        assert elapsed < 2.0  # paced at 25 fps by the synchroniser, not stalled
        assert publisher.av_sync.actual_fps > 0
    finally:
        await publisher.aclose()


def test_cli_reports_a_connection_failure() -> None:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lipsync_livekit", "--url", "ws://127.0.0.1:9", "--token", "x",
                           "--connect-timeout", "10"], check=False, capture_output=True, text=True, timeout=60)
    states = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert states[0]["state"] == "connecting" and states[-1]["state"] == "failed"
    assert "cannot join the room" in states[-1]["error"]
    assert time.monotonic() - t0 < 30
