"""End to end over real WebRTC: a server process, its worker process, and an aiortc client."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.client import AvatarClient
from tests.support.media_analysis import (
    best_lag_correlation,
    envelope,
    mouth_series,
    speech_span,
    video_index,
    wav_bytes,
)
from tests.support.mouth import lower_face

pytestmark = pytest.mark.slow

SENTENCE = "Hello there. I am a digital human, and my lips move with every word I say."
LONG = " ".join(["This is a long sentence that keeps going so that there is time to interrupt it."] * 4)



def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("lipsync_*")}


async def test_offer_answer_streams_video_and_audio(server) -> None:
    async with AvatarClient(server.url) as client:
        sid = await client.connect()
        assert isinstance(sid, str) and sid
        await asyncio.sleep(1.5)
        video, audio = client.received.video, client.received.audio
        assert len(video) >= 25, f"only {len(video)} video frames in 1.5 s"
        assert video[-1].image.shape == (512, 512, 3)
        assert len(audio) >= 40, f"only {len(audio)} audio frames in 1.5 s"
        # idle: silent audio, and the picture is not a frozen still
        assert max(float(np.abs(a.samples).max()) for a in audio) < 0.01
        assert not np.array_equal(video[0].image, video[-1].image)


async def test_text_moves_the_mouth_while_audio_plays_and_is_speaking_goes_true_then_false(server) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()
        await asyncio.sleep(0.3)
        await client.say(SENTENCE)
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=30)
        await asyncio.sleep(0.3)
        env = envelope(client.received)
        span = speech_span(env)
        assert span is not None, "no speech reached the client"
        assert (span[1] - span[0]) * 0.04 > 2.0, "speech much shorter than the sentence"
        idle_ref = lower_face(client.received.video[2].image)
        speaking, idle = [], []
        for v in client.received.video:
            i = video_index(v.pts)
            diff = float(np.abs(lower_face(v.image) - idle_ref).mean())
            if span[0] + 3 <= i <= span[1] - 3:
                speaking.append(diff)
            elif i < span[0] - 3:
                idle.append(diff)
        assert np.mean(speaking) > 3 * max(np.mean(idle), 0.5), (np.mean(speaking), np.mean(idle))


async def test_mouth_opening_follows_the_speech_envelope_at_the_client(server) -> None:
    """The issue's bar: measured by an independent landmark detector on received frames,
    mouth opening correlates with the speech envelope at >= 0.6, best lag within 40 ms."""
    async with AvatarClient(server.url) as client:
        await client.connect()
        await asyncio.sleep(0.3)
        await client.say("We were away a year ago. Why would you worry? Maybe we can all go home now.")
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=30)
        env = envelope(client.received)
        span = speech_span(env)
        assert span is not None
        mouth = mouth_series(client.received, span[0] - 5, span[1] + 5)
        r, lag = best_lag_correlation(mouth, env)
        assert r >= 0.6, f"correlation {r:.2f} at lag {lag}"
        assert abs(lag) <= 1, f"best lag {lag} frames"


async def test_uploaded_wav_is_spoken(server) -> None:
    t = np.arange(int(16000 * 1.6)) / 16000
    syllables = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)
    pcm = 0.3 * np.sin(2 * np.pi * 180 * t) * syllables
    async with AvatarClient(server.url) as client:
        await client.connect()
        reply = await client.upload_audio(wav_bytes(pcm), "speech.wav")
        assert reply["code"] == 0 and abs(reply["data"]["seconds"] - 1.6) < 0.05
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=20)
        span = speech_span(envelope(client.received), 0.02)
        assert span is not None
        assert 1.2 <= (span[1] - span[0] + 1) * 0.04 <= 2.0


async def test_interrupt_silences_speech_within_two_frames(server) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()
        await client.say(LONG)
        await client.wait_speaking(True, timeout=5)
        await asyncio.sleep(1.0)
        reply = await client.interrupt()
        at = reply["data"]["frame"]  # the media frame being decided when the interrupt landed
        assert await client.is_speaking() is False
        await asyncio.sleep(1.0)
        env = envelope(client.received)
        assert env[max(0, at - 10) : at].max() > 0.01, "no speech before the interrupt"
        spoken_after = [i for i in range(at + 1, env.size) if env[i] > 0.01]
        assert not spoken_after or spoken_after[-1] <= at + 2, f"speech until frame {spoken_after[-1]}, interrupt at {at}"


async def test_two_sessions_stay_independent(server) -> None:
    async with AvatarClient(server.url) as a, AvatarClient(server.url) as b:
        await a.connect()
        await b.connect()
        assert a.session_id != b.session_id
        await a.say("Only the first session speaks.")
        await a.wait_speaking(True, timeout=5)
        assert await b.is_speaking() is False
        await a.wait_speaking(False, timeout=20)
        await asyncio.sleep(0.3)
        assert speech_span(envelope(a.received)) is not None
        assert speech_span(envelope(b.received)) is None, "the silent session received speech"


async def test_websocket_reports_queued_started_ended_and_errors(server) -> None:
    async with AvatarClient(server.url) as client:
        await client.connect()
        events = await client.events()
        await events.send("")
        err = await events.until("error")
        assert err["code"] != 0 and "empty" in err["msg"]
        await events.send("Good morning.")
        queued = await events.until("queued")
        started = await events.until("speaking_started", timeout=5)
        ended = await events.until("speaking_ended", timeout=15)
        assert queued["utterance"] == started["utterance"] == ended["utterance"]
        assert started["latency_ms"] < 1000
        await events.send_json({"text": LONG, "interrupt": False})
        await events.until("speaking_started", timeout=5)
        await events.send_json({"text": "Stop. New words.", "interrupt": True})
        cut = await events.until("speaking_ended", timeout=5)
        assert cut.get("interrupted") is True
        await events.close()


async def test_recording_gives_an_h264_aac_mp4(server, tmp_path) -> None:
    import av

    async with AvatarClient(server.url) as client:
        await client.connect()
        await client.post("/record", {"sessionid": client.session_id, "type": "start_record"})
        started = time.monotonic()
        await client.say("Recording this sentence, from start to end.")
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=15)
        reply = await client.post("/record", {"sessionid": client.session_id, "type": "end_record"})
        recorded_s = time.monotonic() - started
        url = reply["data"]["url"]
        async with client.http.get(server.url + url) as resp:
            assert resp.status == 200
            path = tmp_path / "rec.mp4"
            path.write_bytes(await resp.read())
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        frames = sum(1 for _ in c.decode(v))
    with av.open(str(path)) as c:
        audio_s = sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].sample_rate
    assert abs(frames / 25 - recorded_s) < 0.5, (frames, recorded_s)
    assert abs(audio_s - frames / 25) < 0.1, (audio_s, frames)


async def test_closing_sessions_releases_shared_memory(server) -> None:
    before = shm_names()
    clients = [AvatarClient(server.url) for _ in range(2)]
    for c in clients:
        await c.connect()
    assert len(shm_names() - before) == 2
    for c in clients:
        await c.close()
    deadline = time.monotonic() + 10
    while shm_names() - before and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not (shm_names() - before), "a session's ring outlived it"
    assert server.stats()["sessions"] == 0


async def test_session_limit_answers_503_with_a_code(make_server) -> None:
    srv = make_server("--max-sessions", "1")
    async with AvatarClient(srv.url) as first:
        await first.connect()
        second = AvatarClient(srv.url)
        try:
            with pytest.raises(Exception) as info:
                await second.connect(timeout=5)
            failure = info.value
            assert getattr(failure, "status", None) == 503
            assert failure.body["code"] != 0 and "limit" in failure.body["msg"]
        finally:
            await second.close()


async def test_worker_crash_is_survived_without_leaks(make_server) -> None:
    import os
    import signal

    srv = make_server()
    before = shm_names()
    async with AvatarClient(srv.url) as client:
        await client.connect()
        await client.say(LONG)
        await client.wait_speaking(True, timeout=5)
        pid = srv.stats()["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        await client.wait_speaking(False, timeout=10)  # speech cut off, session alive
        deadline = time.monotonic() + 60
        while srv.stats()["worker_pid"] in (pid, None) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert srv.stats()["worker_restarts"] == 1
        n = len(client.received.video)
        await asyncio.sleep(0.5)
        assert len(client.received.video) > n + 5, "video stopped while the worker restarted"
        await client.say("I am back.")
        await client.wait_speaking(True, timeout=10)
        await client.wait_speaking(False, timeout=15)
    await asyncio.sleep(1.0)
    assert not (shm_names() - before)
