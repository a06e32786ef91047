"""Sessions, the manager and the routes in one process: the real application with a
worker stand-in that records what it is sent and answers with frames (see
``tests/support/harness.py``). Fast, and no WebRTC: a viewer reads the session's tracks
the way aiortc's senders do."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for_samples
from pipeline.messages import AudioChunk, CloseSession, FrameReady, Interrupt, OpenSession
from server.errors import ErrorCode
from server.speech import START_LEAD_FRAMES
from tests.support.harness import Harness, ToneTTS, running_server
from tests.support.media_analysis import wav_bytes


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


def chunks_of(h: Harness, utterance: str) -> list[AudioChunk]:
    return [m for m in h.worker.of_type(AudioChunk) if isinstance(m, AudioChunk) and m.utterance_id == utterance]


async def test_text_goes_to_the_worker_as_chunks_and_comes_back_as_frames_with_its_audio(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    status, body = await h.post("/human", {"sessionid": sid, "text": "Hello there.", "type": "echo"})
    assert status == 200 and body["code"] == 0
    utterance = body["data"]["utterance"]
    await h.until(lambda: not viewer.session.is_speaking)
    chunks = chunks_of(h, utterance)
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    assert all(c.generation == 0 and c.sample_rate == SAMPLE_RATE and c.pcm.dtype == np.int16 for c in chunks)
    samples = sum(c.pcm.size for c in chunks)
    assert samples == ToneTTS().samples_for("Hello there.")
    shown = viewer.shown(utterance)
    assert len(shown) == frames_for_samples(samples)  # every frame shown, none twice
    assert shown == list(range(shown[0], shown[0] + len(shown)))  # one after another


async def test_speech_starts_where_the_idle_loop_will_be_two_frames_later(h: Harness) -> None:
    viewer = await h.viewer()
    await asyncio.sleep(0.2)
    cursor = viewer.session.player.cursor
    _status, body = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hi."})
    await h.until(lambda: bool(chunks_of(h, body["data"]["utterance"])))
    first = chunks_of(h, body["data"]["utterance"])[0]
    assert cursor + START_LEAD_FRAMES <= first.start_cursor <= cursor + START_LEAD_FRAMES + 2


async def test_is_speaking_is_true_from_queued_until_the_last_frame_is_shown(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    await h.post("/human", {"sessionid": sid, "text": "One two three."})
    _s, body = await h.post("/is_speaking", {"sessionid": sid})
    assert body["data"] is True
    await h.until(lambda: not viewer.session.is_speaking)
    last_speaking = max(viewer.speaking())
    assert viewer.session.player.last_decided >= last_speaking
    _s, body = await h.post("/is_speaking", {"sessionid": sid})
    assert body["data"] is False


async def test_events_say_queued_started_and_ended_when_the_frames_go_out(h: Harness) -> None:
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    utterance = viewer.session.say("Events, please.")
    got = [await asyncio.wait_for(events.__anext__(), 5) for _ in range(3)]
    assert [e["event"] for e in got] == ["queued", "speaking_started", "speaking_ended"]
    assert all(e["utterance"] == utterance and e["sessionid"] == viewer.session.id for e in got)
    assert got[0]["source"] == "text" and got[2]["interrupted"] is False
    assert got[1]["latency_ms"] >= 0
    # started fired when the first speaking frame was decided: the viewer has it by then or a frame later
    assert got[0]["t"] <= got[1]["t"] <= got[2]["t"]


async def test_interrupt_cuts_speech_everywhere_and_frames_already_rendered_are_never_shown(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    events = viewer.session.events.subscribe()
    _s, body = await h.post("/human", {"sessionid": sid, "text": "This goes on for quite a while, on and on and on."})
    utterance = body["data"]["utterance"]
    await h.until(lambda: viewer.shown(utterance))
    status, body = await h.post("/interrupt_talk", {"sessionid": sid})
    assert status == 200 and body["data"]["interrupted"] == [utterance]
    cut_at = body["data"]["frame"]
    assert h.worker.of_type(Interrupt) == [Interrupt(sid)]
    _s, speaking = await h.post("/is_speaking", {"sessionid": sid})
    assert speaking["data"] is False
    await asyncio.sleep(0.3)
    assert max(n for n, _image in viewer.video) > cut_at + 5
    assert not [n for n in viewer.shown(utterance) if n > cut_at]
    kinds = []
    while True:
        e = await asyncio.wait_for(events.__anext__(), 1)
        kinds.append(e["event"])
        if e["event"] == "speaking_ended":
            assert e["interrupted"] is True
            break
    assert viewer.session.ring.free_count() == viewer.session.ring.slots  # every slot back


async def test_speech_after_an_interrupt_carries_the_new_generation(h: Harness) -> None:
    viewer = await h.viewer()
    first = viewer.session.say("Long enough to be cut off in the middle of it.")
    await h.until(lambda: viewer.shown(first))
    second = viewer.session.say("Second.", interrupt=True)
    await h.until(lambda: not viewer.session.is_speaking)
    assert {c.generation for c in chunks_of(h, second)} == {1}
    assert viewer.shown(second)


async def test_a_stale_frame_arriving_after_an_interrupt_is_released_unshown(h: Harness) -> None:
    viewer = await h.viewer()
    session = viewer.session
    session.interrupt()
    ring = session.ring
    slot = ring.acquire()
    assert slot is not None
    ring.publish(slot)
    audio = np.zeros(SAMPLES_PER_FRAME, np.int16)
    h.manager.on_worker_message(FrameReady(session.id, 0, "old", 0, slot, 0, 0, audio, True))
    assert ring.free_count() == ring.slots


async def test_a_worker_restart_reopens_every_session_and_reports_the_cut(h: Harness) -> None:
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    utterance = viewer.session.say("Speaking while the worker dies, which it will.")
    await h.until(lambda: viewer.shown(utterance))
    await h.worker.crash_and_restart()
    assert h.worker.of_type(OpenSession) == [viewer.session.open_message()] * 2  # opened, then re-opened
    seen: list[dict[str, object]] = []
    while not any(e["event"] == "speaking_ended" for e in seen):
        seen.append(await asyncio.wait_for(events.__anext__(), 2))
    error = next(e for e in seen if e["event"] == "error")
    assert error["code"] == ErrorCode.WORKER_UNAVAILABLE and "restarted" in error["msg"]
    assert not viewer.session.is_speaking
    again = viewer.session.say("Back.")
    await h.until(lambda: viewer.shown(again))
    _s, body = await h.post("/stats", {})
    # /stats is GET; POST is refused with the JSON error
    assert body["code"] == ErrorCode.METHOD_NOT_ALLOWED
    async with h.client.get("/stats") as resp:
        stats = (await resp.json())["data"]
    assert stats["worker_restarts"] == 1 and stats["sessions"] == 1


async def test_closing_a_session_tells_the_worker_and_frees_its_ring(h: Harness) -> None:
    viewer = await h.viewer()
    name = viewer.session.ring.name
    await h.manager.close(viewer.session.id)
    assert CloseSession(viewer.session.id) in h.worker.sent
    assert not Path("/dev/shm", name).exists()
    status, body = await h.post("/human", {"sessionid": viewer.session.id, "text": "hi"})
    assert status == 404 and body["code"] == ErrorCode.UNKNOWN_SESSION


async def test_recording_is_a_frame_sink_with_the_session_audio(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    assert (await h.post("/record", {"sessionid": sid, "type": "start_record"}))[0] == 200
    status, body = await h.post("/record", {"sessionid": sid, "type": "start_record"})
    assert status == 409 and body["code"] == ErrorCode.CONFLICT
    viewer.session.say("Recorded words.")
    await h.until(lambda: not viewer.session.is_speaking)
    status, body = await h.post("/record", {"sessionid": sid, "type": "end_record"})
    assert status == 200 and body["data"]["url"] == f"/record/{sid}?secret={viewer.session.secret}"
    async with h.client.get(body["data"]["url"]) as resp:
        assert resp.status == 200
        data = await resp.read()
    path = viewer.session.last_recording
    assert path is not None and path.read_bytes() == data
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    assert frames >= frames_for_samples(ToneTTS().samples_for("Recorded words."))
    assert abs(audio.size - frames * SAMPLES_PER_FRAME) <= 1024 and np.abs(audio).max() > 0.1


async def test_set_audiotype_checks_the_clip_and_reinit_restarts_the_idle_loop(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    await asyncio.sleep(0.2)
    status, body = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": 3, "reinit": False})
    assert status == 400 and "its clips: none; 0 or 1 is the idle loop" in body["msg"]  # 1: LiveTalking's "silence"
    status, body = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": 0, "reinit": True})
    assert status == 200 and body["data"] == {"audiotype": 0, "switched": True, "reinit": True, "clip": None}
    assert viewer.session.player.cursor <= 2


async def test_tts_failure_is_an_error_event_and_the_session_stays_up(tmp_path: Path) -> None:
    async with running_server(tmp_path, tts=ToneTTS(fail_after=0)) as h:
        viewer = await h.viewer()
        events = viewer.session.events.subscribe()
        utterance = viewer.session.say("This will not be spoken.")
        got = [await asyncio.wait_for(events.__anext__(), 2) for _ in range(3)]
        assert [e["event"] for e in got] == ["queued", "error", "speaking_ended"]
        assert got[1]["code"] == ErrorCode.TTS_FAILED and got[2] == {**got[2], "utterance": utterance, "error": True}
        assert not viewer.session.is_speaking and not viewer.session.closed


async def test_uploaded_audio_plays_whole_in_one_second_chunks(h: Harness) -> None:
    viewer = await h.viewer()
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE)
    form = aiohttp.FormData({"sessionid": viewer.session.id, "secret": viewer.session.secret})
    form.add_field("file", wav_bytes(tone), filename="tone.wav")
    async with h.client.post("/humanaudio", data=form) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["data"]["seconds"] == 2.5
    chunks = chunks_of(h, body["data"]["utterance"])
    assert [c.pcm.size for c in chunks] == [SAMPLE_RATE, SAMPLE_RATE, SAMPLE_RATE // 2, 0]


async def test_the_websocket_speaks_text_and_streams_the_events(h: Harness) -> None:
    viewer = await h.viewer()
    async with h.client.ws_connect(f"/humanecho?sessionid={viewer.session.id}&secret={viewer.session.secret}") as ws:
        await ws.send_str("Over the socket.")
        kinds = []
        while "speaking_ended" not in kinds:
            kinds.append((await ws.receive_json(timeout=5))["event"])
        assert kinds == ["queued", "speaking_started", "speaking_ended"]
        await ws.send_str("   ")
        error = await ws.receive_json(timeout=5)
        assert error["event"] == "error" and error["code"] == ErrorCode.EMPTY_TEXT


async def test_sessions_beyond_the_limit_are_refused_with_503(tmp_path: Path) -> None:
    async with running_server(tmp_path, max_sessions=1) as h:
        await h.viewer()
        with pytest.raises(Exception, match="limit of 1 sessions") as caught:
            await h.viewer()
        assert getattr(caught.value, "code", None) == ErrorCode.TOO_MANY_SESSIONS


async def test_a_worker_that_cannot_open_a_session_leaves_nothing_behind(tmp_path: Path) -> None:
    async with running_server(tmp_path, fail_open=True) as h:
        before = set(Path("/dev/shm").glob("lipsync_*"))
        with pytest.raises(Exception, match="could not open the session"):
            await h.viewer()
        assert set(Path("/dev/shm").glob("lipsync_*")) == before and len(h.manager) == 0


async def test_gen_renders_through_the_worker_and_returns_the_path_inside_the_data_dir(h: Harness, tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "a.wav").write_bytes(wav_bytes(np.zeros(SAMPLE_RATE // 2)))
    body = {"user_id": "u1", "request_id": "r1", "streamer_id": "tiny", "tts_path": "audio/a.wav", "chunk_id": 2}
    status, out = await h.post("/digital_human/gen", body)
    assert status == 200 and out["digital_human_mp4_path"] == str((tmp_path / "outputs/u1/r1_2.mp4").resolve())
    assert Path(out["digital_human_mp4_path"]).is_file() and out["data"]["frames"] == 13
    async with h.client.get(out["data"]["url"]) as resp:
        assert resp.status == 200 and await resp.read() == Path(out["digital_human_mp4_path"]).read_bytes()


async def test_tts_failing_mid_reply_reports_plays_what_it_had_and_goes_on(tmp_path: Path) -> None:
    async with running_server(tmp_path, tts=ToneTTS(fail_after=1)) as h:
        viewer = await h.viewer()
        events = viewer.session.events.subscribe()
        first = viewer.session.say("The first sentence speaks. The second one fails.")
        got = []
        while not got or got[-1]["event"] != "speaking_ended":
            got.append(await asyncio.wait_for(events.__anext__(), 5))
        kinds = [e["event"] for e in got]
        assert kinds[0] == "queued" and "error" in kinds and "speaking_started" in kinds
        assert next(e for e in got if e["event"] == "error")["code"] == ErrorCode.TTS_FAILED
        assert viewer.shown(first)  # the first sentence was shown
        second = viewer.session.say("Still here.")  # the session goes on (this TTS fails from its second sentence)
        await h.until(lambda: bool(viewer.shown(second)))
