"""The worker's side of the lip-sync server, against the real server (no LiveKit needed):
a session opens with both tracks, streamed PCM plays as segments whose playback events
carry LiveKit's meanings, and clear_buffer cuts one short."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from server_fixture import ServerProcess

from lipsync_livekit.server_client import ServerSession

RATE = 24_000


def speech(seconds: float) -> bytes:
    """A voiced buzz with syllables, s16le mono at 24 kHz."""
    t = np.arange(int(seconds * RATE)) / RATE
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 10))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.5
    return (0.3 * voice / np.abs(voice).max() * envelope * 32767).astype("<i2").tobytes()


async def stream(session: ServerSession, pcm: bytes, piece_s: float = 0.02) -> None:
    """At real time, in pieces, as an agent's TTS arrives."""
    step = int(piece_s * RATE) * 2
    for start in range(0, len(pcm), step):
        await session.send_pcm(pcm[start : start + step], RATE, 1)
        await asyncio.sleep(piece_s)


async def next_event(events: Any, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for event in events:
            if event.get("event") == kind:
                return dict(event)
        raise AssertionError(f"the stream closed before {kind}")

    return await asyncio.wait_for(find(), timeout)


async def test_streamed_segments_play_out_and_a_clear_cuts_one_short(server: ServerProcess) -> None:
    session = ServerSession(server.url)
    await session.open()
    try:
        assert session.video_track is not None and session.audio_track is not None
        frame = await asyncio.wait_for(session.video_track.recv(), 10)
        assert (frame.width, frame.height) == (512, 512)
        events = session.events()

        await stream(session, speech(1.0))
        await session.end_segment()
        started = await next_event(events, "playback_started")
        finished = await next_event(events, "playback_finished")
        assert finished["segment"] == started["segment"] and finished["interrupted"] is False
        assert abs(finished["playback_position"] - 1.0) < 0.05

        sender = asyncio.ensure_future(stream(session, speech(4.0)))
        await next_event(events, "playback_started")
        await asyncio.sleep(0.5)
        await session.clear_buffer()
        cut = await next_event(events, "playback_finished")
        sender.cancel()
        assert cut["interrupted"] is True and 0.2 < cut["playback_position"] < 2.0
    finally:
        await session.close()
