"""``GET /audio_stream``: streamed PCM in with LiveKit's avatar semantics. In-process
(``tests/support/harness.py``: the real app, a FakeWorker that paints each utterance a flat
colour, a Viewer reading the tracks on their clock) for the protocol, the frames and the
positions; over real WebRTC with a real server process for the latency at a client."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from media.resample import StreamResampler
from media.timing import FRAME_S, SAMPLE_RATE, VIDEO_TICKS_PER_FRAME
from server.errors import ErrorCode
from server.frames import MediaFrame
from tests.support.client import AvatarClient
from tests.support.harness import Harness, Viewer, running_server
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)

PIECE_S = 0.02  # what LiveKit's and pipecat's TTS frames usually carry


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


def tone(seconds: float, rate: int = 24_000, channels: int = 2, hz: float = 220.0) -> bytes:
    """s16le, interleaved."""
    t = np.arange(round(seconds * rate)) / rate
    mono = (0.3 * 32767 * np.sin(2 * math.pi * hz * t)).astype(np.int16)
    return np.repeat(mono, channels).tobytes()


def pieces(data: bytes, rate: int = 24_000, channels: int = 2, piece_s: float = PIECE_S) -> list[bytes]:
    size = round(piece_s * rate) * 2 * channels
    return [data[i : i + size] for i in range(0, len(data), size)]


class Frames:
    """Every frame the session's player hands out, with the time it did (a frame sink)."""

    def __init__(self, viewer: Viewer) -> None:
        self.frames: list[tuple[float, MediaFrame]] = []
        viewer.session.player.add_sink(lambda f: self.frames.append((time.monotonic(), f)))

    def of(self, segment: str) -> list[tuple[float, MediaFrame]]:
        return [(t, f) for t, f in self.frames if f.utterance_id == segment]

    def indices(self, segment: str) -> list[int]:
        return [f.index for _t, f in self.of(segment)]

    def audio(self, segment: str) -> np.ndarray:
        return np.concatenate([f.audio for _t, f in self.of(segment)])


class Socket:
    """An /audio_stream client that keeps every event with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[Any]) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append((time.monotonic(), json.loads(msg.data)))
                self._changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for _t, e in self.events if e["event"] == kind]

    async def until(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{count} {kind!r} not seen within {timeout} s: {[e for _t, e in self.events]}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return self.of(kind)

    async def send(self, body: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(body))

    async def stream(self, data: list[bytes], speed: float = 1.0, rate: int = 24_000, channels: int = 2) -> float:
        """Send ``data`` paced at ``speed`` x real time (by the clock, not by sleeps adding
        up); returns when the first piece went out."""
        started = time.monotonic()
        sent_s = 0.0
        for piece in data:
            await self.ws.send_bytes(piece)
            sent_s += len(piece) / (2 * channels * rate)
            delay = started + sent_s / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return started

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def connect(h: Harness, viewer: Viewer, query: str | None = None) -> Socket:
    q = query if query is not None else f"sessionid={viewer.session.id}&secret={viewer.session.secret}"
    return Socket(await h.client.ws_connect(f"/audio_stream?{q}"))


def contiguous(indices: list[int]) -> bool:
    return indices == list(range(indices[0], indices[0] + len(indices))) if indices else False


async def test_real_time_24k_stereo_segments_play_whole_gapless_and_in_order(h: Harness) -> None:
    viewer = await h.viewer()
    frames = Frames(viewer)
    sock = await connect(h, viewer)
    echo = await h.client.ws_connect(f"/humanecho?sessionid={viewer.session.id}&secret={viewer.session.secret}")
    await sock.send({"type": "format", "sample_rate": 24_000, "channels": 2})
    lengths = (1.0, 0.6)
    sent_at = []
    for seconds in lengths:
        sent_at.append(await sock.stream(pieces(tone(seconds))))
        await sock.send({"type": "end_of_segment"})
    finished = await sock.until("playback_finished", 2)
    started = sock.of("playback_started")
    sid = viewer.session.id
    assert [e["segment"] for e in started] == [f"{sid}-a1", f"{sid}-a2"]
    assert [e["segment"] for e in finished] == [f"{sid}-a1", f"{sid}-a2"]
    assert [e["interrupted"] for e in finished] == [False, False]
    assert [e["playback_position"] for e in finished] == list(lengths)
    order = [(e["event"], e.get("segment")) for _t, e in sock.events]
    assert order == [("playback_started", f"{sid}-a1"), ("playback_finished", f"{sid}-a1"),
                     ("playback_started", f"{sid}-a2"), ("playback_finished", f"{sid}-a2")]
    latencies = []
    for seconds, segment, t0 in zip(lengths, (f"{sid}-a1", f"{sid}-a2"), sent_at, strict=True):
        shown = frames.indices(segment)
        assert len(shown) == round(seconds / FRAME_S), (segment, len(shown))
        assert contiguous(shown), f"{segment} had gaps: {shown}"
        # the audio that went out is the input resampled, whole
        reference = StreamResampler(24_000, 2)
        expected = np.concatenate([reference.feed(tone(seconds)), reference.flush()])
        played = frames.audio(segment)
        assert played.size == expected.size == round(seconds * SAMPLE_RATE)
        assert np.abs(played.astype(int) - expected.astype(int)).max() <= 2
        latencies.append(frames.of(segment)[0][0] - t0)
    log.info("first piece -> first speaking frame (in-process): %s ms", [round(x * 1000) for x in latencies])
    assert latencies[0] < 0.25
    # the session's own events fire for segments too, with no text
    seen: list[dict[str, Any]] = []
    while len([e for e in seen if e["event"] == "speaking_ended"]) < 2:
        seen.append(await echo.receive_json(timeout=5))
    queued = [e for e in seen if e["event"] == "queued"]
    assert [e["utterance"] for e in queued] == [f"{sid}-a1", f"{sid}-a2"]
    assert all(e["source"] == "stream" and e["text"] is None for e in queued)
    ended = [e for e in seen if e["event"] == "speaking_ended"]
    assert [e["interrupted"] for e in ended] == [False, False]
    await echo.close()
    await sock.close()


async def test_clear_buffer_mid_segment_stops_now_and_answers_interrupted(h: Harness) -> None:
    viewer = await h.viewer()
    frames = Frames(viewer)
    sock = await connect(h, viewer)
    await sock.send({"type": "format", "sample_rate": 48_000, "channels": 1})
    data = pieces(tone(2.0, 48_000, 1), 48_000, 1)
    await sock.stream(data[:40], rate=48_000, channels=1)  # 0.8 s of 2 s
    await sock.until("playback_started")
    await sock.send({"type": "clear_buffer"})
    (finished,) = await sock.until("playback_finished")
    segment = finished["segment"]
    cut_at = viewer.session.player.last_decided
    assert finished["interrupted"] is True
    played = len(frames.indices(segment))
    assert 0 < finished["playback_position"] < 0.8
    assert finished["playback_position"] == pytest.approx(played * FRAME_S, abs=1e-6)
    # what follows the clear is a new segment; nothing of the old one plays again
    await sock.stream(data[40:50], rate=48_000, channels=1)
    await sock.send({"type": "end_of_segment"})
    done = await sock.until("playback_finished", 2)
    assert done[1]["segment"] != segment and done[1]["interrupted"] is False and done[1]["playback_position"] == 0.2
    assert max(frames.indices(segment)) <= cut_at
    assert not viewer.session.is_speaking
    await sock.close()


async def test_audio_slower_than_real_time_does_not_end_the_segment(h: Harness) -> None:
    viewer = await h.viewer()
    frames = Frames(viewer)
    sock = await connect(h, viewer)
    await sock.send({"type": "format", "sample_rate": 16_000, "channels": 1})
    await sock.stream(pieces(tone(1.0, 16_000, 1), 16_000, 1), speed=0.5, rate=16_000, channels=1)
    await asyncio.sleep(0.3)  # a pause in the agent's TTS, the segment still open
    assert not sock.of("playback_finished") and viewer.session.is_speaking
    ended_at = time.monotonic()
    await sock.send({"type": "end_of_segment"})
    (finished,) = await sock.until("playback_finished")
    segment = finished["segment"]
    assert finished == {"event": "playback_finished", "segment": segment, "playback_position": 1.0, "interrupted": False}
    assert len(frames.indices(segment)) == 25  # every 40 ms of it shown once, gaps of idle frames between
    t_finished = next(t for t, e in sock.events if e["event"] == "playback_finished")
    assert t_finished > ended_at
    await sock.close()


async def test_bad_messages_get_an_error_event_and_the_socket_stays_up(h: Harness) -> None:
    viewer = await h.viewer()
    sock = await connect(h, viewer)
    for message, code in (
        ({"type": "format", "sample_rate": 7000}, ErrorCode.INVALID_FIELD),
        ({"type": "format", "sample_rate": 96_000, "channels": 1}, ErrorCode.INVALID_FIELD),
        ({"type": "format", "sample_rate": 24_000, "channels": 3}, ErrorCode.INVALID_FIELD),
        ({"type": "format", "sample_rate": "fast"}, ErrorCode.INVALID_FIELD),
        ({"type": "play"}, ErrorCode.INVALID_FIELD),
        ({"sample_rate": 24_000}, ErrorCode.MISSING_FIELD),
    ):
        await sock.send(message)
        errors = await sock.until("error", len(sock.of("error")) + 1)
        assert errors[-1]["code"] == code, (message, errors[-1])
    await sock.ws.send_str("{not json")
    errors = await sock.until("error", 7)
    assert errors[-1]["code"] == ErrorCode.INVALID_JSON
    # the format stayed 16 kHz mono: odd-sized pieces are joined
    data = tone(0.3, 16_000, 1)
    for i in range(0, len(data), 333):
        await sock.ws.send_bytes(data[i : i + 333])
    await sock.send({"type": "end_of_segment"})
    (finished,) = await sock.until("playback_finished")
    assert finished["playback_position"] == 0.3 and finished["interrupted"] is False
    await sock.close()


async def test_a_stream_is_bounded_by_the_sessions_speech_limits(tmp_path: Path) -> None:
    """Past the limit a piece is dropped with one error event per segment (never a blocked
    read: a clear_buffer behind it must get through at once)."""
    async with running_server(tmp_path, max_queued_speech_s=1.0, max_queued_utterances=2) as h:
        viewer = await h.viewer()
        sock = await connect(h, viewer)
        # the feeder sends up to 8 s ahead to the worker; beyond that 1 s may wait here
        await sock.stream(pieces(tone(12.0, 16_000, 1), 16_000, 1), speed=200, rate=16_000, channels=1)
        (error,) = await sock.until("error")
        assert error["code"] == ErrorCode.TOO_MANY_REQUESTS and "dropped" in error["msg"]
        await sock.send({"type": "clear_buffer"})
        (finished,) = await sock.until("playback_finished")
        assert finished["interrupted"] is True
        for _ in range(3):  # two segments queued (the limit), the third refused
            await sock.ws.send_bytes(tone(0.2, 16_000, 1))
            await sock.send({"type": "end_of_segment"})
        errors = await sock.until("error", 2)
        assert errors[1]["code"] == ErrorCode.TOO_MANY_REQUESTS and "utterances" in errors[1]["msg"]
        all_finished = await sock.until("playback_finished", 3)
        assert [e["playback_position"] for e in all_finished[1:]] == [0.2, 0.2]
        assert len({e["segment"] for e in all_finished}) == 3
        await sock.close()


async def test_audio_stream_needs_what_humanecho_needs(tmp_path: Path) -> None:
    async with running_server(tmp_path, token="tok") as h:
        viewer = await h.viewer()
        sid = viewer.session.id
        async with h.client.get(f"/audio_stream?sessionid={sid}&secret={viewer.session.secret}") as resp:
            assert resp.status == 401
        async with h.client.get(f"/audio_stream?sessionid={sid}&token=tok") as resp:
            assert resp.status == 400 and (await resp.json())["code"] == ErrorCode.MALFORMED_REQUEST  # not a WebSocket
        sock = await connect(h, viewer, f"sessionid={sid}&token=tok")  # the operator may address any session
        await sock.ws.send_bytes(tone(0.1, 16_000, 1))
        await sock.send({"type": "end_of_segment"})
        await sock.until("playback_finished")
        await sock.close()
    async with running_server(tmp_path) as h:
        first, other = await h.viewer(), await h.viewer()
        ws = await h.client.ws_connect(f"/audio_stream?sessionid={other.session.id}")  # no secret
        event = await ws.receive_json(timeout=5)
        assert event["event"] == "error" and event["code"] == ErrorCode.FORBIDDEN
        assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        sock = await connect(h, first, "")  # no sessionid: the default session
        await sock.ws.send_bytes(tone(0.1, 16_000, 1))
        await sock.send({"type": "end_of_segment"})
        (finished,) = await sock.until("playback_finished")
        assert finished["segment"].startswith(first.session.id)
        # the session closing closes the socket, after its last events
        await sock.ws.send_bytes(tone(0.5, 16_000, 1))
        await sock.until("playback_started", 2)
        await h.manager.close(first.session.id)
        await sock.until("closed")
        assert sock.of("playback_finished")[-1]["interrupted"] is True
        await sock.close()


@pytest.mark.slow
async def test_first_piece_to_first_speaking_frame_over_real_webrtc(server: ServerProcess) -> None:
    """A real server (CPU engine) and an aiortc client: 24 kHz stereo in 20 ms pieces at real
    time; the first loud audio packet and the first speaking video frame on the wire against
    the first piece sent; speech heard without gaps."""
    async with AvatarClient(server.url, keep_images=False, tap_packets=True) as client:
        await client.connect()
        assert client.http is not None
        ws = await client.http.ws_connect(f"{server.url}/audio_stream?sessionid={client.session_id}", headers=client.headers)
        sock = Socket(ws)
        await sock.send({"type": "format", "sample_rate": 24_000, "channels": 2})
        await asyncio.sleep(0.5)
        to_audio, to_video, to_event, runs = [], [], [], []
        for k in range(5):
            before = time.monotonic()
            t0 = await sock.stream(pieces(tone(1.2)))
            await sock.send({"type": "end_of_segment"})
            await sock.until("playback_finished", k + 1)
            await asyncio.sleep(0.4)
            loud = [p for p in client.received.audio_packets if p.rms > 0.01 and p.t > before]
            assert loud, "no speech reached the client"
            index = loud[0].pts // int(48_000 * FRAME_S)
            video = [v for v in client.received.video_packets if round(v.pts / VIDEO_TICKS_PER_FRAME) >= index]
            started = next(t for t, e in sock.events if e["event"] == "playback_started" and t > before)
            to_audio.append(loud[0].t - t0)
            to_video.append(video[0].t - t0)
            to_event.append(started - t0)
            steps = np.diff([p.pts for p in loud]) // 960
            runs.append(int((steps != 1).sum()))
            assert len(loud) >= 1.2 / 0.02 - 2, f"speech heard {len(loud) * 20} ms of 1200"
        await sock.close()
    ms = lambda xs: [round(x * 1000) for x in xs]  # noqa: E731
    log.info("first piece -> first loud audio packet %s ms, -> first speaking video frame %s ms, -> playback_started %s ms; "
             "breaks in the loud packets per segment %s", ms(to_audio), ms(to_video), ms(to_event), runs)
    assert max(runs) == 0, f"gaps in the speech at the client: {runs}"
    assert float(np.percentile(to_video, 95)) <= 0.25 and float(np.percentile(to_audio, 95)) <= 0.25
