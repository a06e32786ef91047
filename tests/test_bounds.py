"""Everything a client can make the server hold is bounded, and each refusal is a clear 4xx:
queued speech per session (count and seconds) with backpressure to the worker, audio that
is not speech, concurrent decodes, offers that never connect, idle sessions, /gen length.
In-process (``tests/support/harness.py``)."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

import server.manager
from media.timing import SAMPLE_RATE
from pipeline.messages import AudioChunk, CancelJob, GenerateVideo
from server.errors import ErrorCode, TooManyRequests
from server.speech import AHEAD_S
from tests.support.harness import Harness, ToneTTS, running_server
from tests.support.media_analysis import wav_bytes


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path, max_queued_utterances=3, max_queued_speech_s=20.0) as harness:
        yield harness


async def test_a_session_queues_at_most_so_many_utterances(h: Harness) -> None:
    await h.viewer()
    for _ in range(3):
        assert (await h.post("/human", {"text": "One more."}))[0] == 200
    status, body = await h.post("/human", {"text": "Too many."})
    assert status == 429 and body["code"] == ErrorCode.TOO_MANY_REQUESTS and "interrupt" in body["msg"]
    await h.post("/interrupt_talk", {})
    assert (await h.post("/human", {"text": "Room again."}))[0] == 200


async def test_a_session_queues_at_most_so_many_seconds_of_speech(h: Harness) -> None:
    await h.viewer()
    status, body = await h.post("/human", {"text": "x" * 400})  # ~32 s of speech by the estimate
    assert status == 429 and "s of speech queued" in body["msg"]


async def test_the_feeder_sends_only_so_far_ahead_of_what_is_shown(tmp_path: Path) -> None:
    tts = ToneTTS(ms_per_char=100)  # each sentence below: 1.5 s
    async with running_server(tmp_path, tts=tts, max_queued_speech_s=600.0) as h:
        session = await h.manager.create(h.manager.avatar("tiny"))  # nobody watches: nothing is shown
        session.say(" ".join(["Fifteen chars."] * 20))  # 30 s of speech
        await asyncio.sleep(1.0)
        sent = sum(m.pcm.size for m in h.worker.of_type(AudioChunk) if isinstance(m, AudioChunk)) / SAMPLE_RATE
        assert AHEAD_S <= sent <= AHEAD_S + 1.5, f"{sent:.1f} s sent with nothing shown"


async def test_audio_that_is_not_speech_is_refused(h: Harness) -> None:
    viewer = await h.viewer()
    one_hertz = wav_bytes(np.zeros(100), rate=1)  # 1 kB that would decode to 100 s
    form = aiohttp.FormData({"sessionid": viewer.session.id, "secret": viewer.session.secret})
    form.add_field("file", one_hertz, filename="tiny.wav")
    async with h.client.post("/humanaudio", data=form) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["code"] == ErrorCode.UNSUPPORTED_AUDIO and "8000 Hz" in body["msg"]


async def test_decodes_beyond_the_limit_are_refused_not_queued(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow_decode(data: bytes, max_seconds: float) -> np.ndarray:
        release.wait(5)
        return np.zeros(SAMPLE_RATE, np.int16)

    monkeypatch.setattr(server.manager, "decode_audio", slow_decode)
    busy = [asyncio.ensure_future(h.manager.decode(b"x", 10.0)) for _ in range(h.manager.config.max_decodes)]
    await asyncio.sleep(0.05)
    with pytest.raises(TooManyRequests, match="being decoded"):
        await h.manager.decode(b"x", 10.0)
    release.set()
    assert all(len(pcm) == SAMPLE_RATE for pcm in await asyncio.gather(*busy))


async def test_offers_that_never_connect_are_bounded_per_client(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_pending_offers=2) as h:
        pcs = []
        statuses = []
        for _ in range(3):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pcs.append(pc)
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            # never given the answer: ICE never completes
            async with h.client.post("/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
                statuses.append((resp.status, (await resp.json())["code"]))
        assert statuses[:2] == [(200, 0), (200, 0)] and statuses[2] == (429, ErrorCode.TOO_MANY_REQUESTS)
        for pc in pcs:
            await pc.close()


async def test_a_session_nobody_drives_is_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path, idle_timeout_s=0.4) as h:
        viewer = await h.viewer()
        await h.until(lambda: viewer.session.closed, timeout=3.0)
        assert len(h.manager) == 0


async def test_gen_refuses_audio_longer_than_its_limit(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_gen_seconds=1.0) as h:
        (tmp_path / "long.wav").write_bytes(wav_bytes(np.zeros(2 * SAMPLE_RATE)))
        body = {"user_id": "u", "request_id": "r", "streamer_id": "tiny", "tts_path": "long.wav"}
        status, reply = await h.post("/digital_human/gen", body)
        assert status == 400 and "at most 1 s" in reply["msg"]


async def test_a_running_gen_job_can_be_cancelled(tmp_path: Path) -> None:
    async with running_server(tmp_path, hold_jobs=True) as h:
        (tmp_path / "a.wav").write_bytes(wav_bytes(np.zeros(SAMPLE_RATE)))
        body = {"user_id": "u", "request_id": "r7", "streamer_id": "tiny", "tts_path": "a.wav", "chunk_id": 1}
        gen = asyncio.ensure_future(h.post("/digital_human/gen", body))
        await h.until(lambda: bool(h.worker.of_type(GenerateVideo)))
        async with h.client.delete("/digital_human/gen", json={"user_id": "u", "request_id": "r7"}) as resp:
            reply = await resp.json()
        assert resp.status == 200 and reply["data"]["cancelled"] == 1
        status, answered = await gen
        assert status == 409 and "cancelled" in answered["msg"]
        async with h.client.delete("/digital_human/gen", json={"user_id": "u", "request_id": "r7"}) as resp:
            assert resp.status == 404


async def test_a_gen_job_past_its_time_is_cancelled(tmp_path: Path) -> None:
    async with running_server(tmp_path, hold_jobs=True, job_timeout_s=0.3) as h:
        (tmp_path / "a.wav").write_bytes(wav_bytes(np.zeros(SAMPLE_RATE)))
        body = {"user_id": "u", "request_id": "r", "streamer_id": "tiny", "tts_path": "a.wav"}
        status, reply = await h.post("/digital_human/gen", body)
        assert status == 503 and "cancelled" in reply["msg"]
        assert h.worker.of_type(CancelJob)
