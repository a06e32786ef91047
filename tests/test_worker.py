"""The worker loop in-process: batching across sessions, backpressure, interrupt, audio coverage."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatars.default import ensure_default_avatar
from media.pcm import Pcm, to_float
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipeline.engines import create_engine
from pipeline.engines.cpu_mouth import CpuMouthEngine, MouthFeature
from pipeline.frame_ring import FrameRing
from pipeline.messages import AudioChunk, FrameReady, Interrupt, OpenSession, SessionOpened
from pipeline.worker import WorkerLoop


class Outbox(list):
    """Stands in for the result queue: the worker only calls put()."""

    def put(self, msg: object) -> None:
        self.append(msg)


@pytest.fixture(scope="module")
def engine(data_dir: Path):
    ensure_default_avatar(data_dir)
    return create_engine("cpu", data_dir)


class Worker(WorkerLoop[MouthFeature]):
    """The worker loop with the server's side of opening a session (its ring) at hand."""

    def __init__(self, engine: CpuMouthEngine, data_dir: Path, outbox: Outbox) -> None:
        super().__init__(engine, data_dir, outbox, max_batch=8)
        self.replies = outbox
        self.rings: list[FrameRing] = []

    def open_session(self, sid: str, slots: int = 8) -> FrameRing:
        avatar = self._avatar("default")
        ring = FrameRing.create(slots, avatar.frame_shape)
        self.rings.append(ring)
        self.handle(OpenSession(sid, "default", ring.name, slots, avatar.frame_shape))
        opened = self.replies[-1]
        assert isinstance(opened, SessionOpened) and opened.ok
        return ring


@pytest.fixture
def loop(engine, data_dir: Path):
    outbox = Outbox()
    worker = Worker(engine, data_dir, outbox)
    yield worker, outbox
    worker.close()
    for ring in worker.rings:
        ring.close()


def speech(seconds: float, seed: int = 0) -> Pcm:
    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    pcm = 0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 4 * t) > 0) + 0.01 * rng.standard_normal(t.size)
    return (pcm * 32767).astype(np.int16)


def frames(outbox: list, sid: str | None = None) -> list[FrameReady]:
    return [m for m in outbox if isinstance(m, FrameReady) and (sid is None or m.session_id == sid)]


def test_one_batch_holds_frames_of_every_speaking_session(loop) -> None:
    worker, outbox = loop
    worker.open_session("a")
    worker.open_session("b")
    worker.handle(AudioChunk("a", 0, "a1", speech(0.4), final=True))
    worker.handle(AudioChunk("b", 0, "b1", speech(0.4, 1), final=True))
    n = worker.render_batch()
    assert n == 8
    assert {f.session_id for f in frames(outbox)} == {"a", "b"}


def test_full_ring_stops_rendering_until_a_slot_is_released(loop) -> None:
    worker, outbox = loop
    ring = worker.open_session("a", slots=3)
    worker.handle(AudioChunk("a", 0, "u", speech(1.0), final=True))
    while worker.render_batch():
        pass
    sent = frames(outbox)
    assert len(sent) == 3  # the ring never grows
    ring.release(sent[0].slot)
    assert worker.render_batch() == 1


def test_every_sample_is_carried_by_exactly_one_frame_and_the_tail_is_padded(loop) -> None:
    worker, outbox = loop
    ring = worker.open_session("a", slots=32)
    pcm = speech(0.5)[: SAMPLES_PER_FRAME * 12 + 100]  # 12 frames and 100 samples
    worker.handle(AudioChunk("a", 0, "u", pcm[:1500], start_cursor=7))
    worker.handle(AudioChunk("a", 0, "u", pcm[1500:], final=True))
    while worker.render_batch():
        pass
    sent = frames(outbox)
    assert [f.seq for f in sent] == list(range(13))
    assert sent[-1].last and not any(f.last for f in sent[:-1])
    audio = np.concatenate([f.audio for f in sent])
    assert np.array_equal(audio[: pcm.size], pcm) and not audio[pcm.size :].any()
    avatar = worker.avatars["default"]
    assert [f.avatar_index for f in sent] == [avatar.idle_index(7 + k) for k in range(13)]
    assert [f.cursor for f in sent] == [7 + k for k in range(13)]
    assert ring.free_count() == 32 - 13


def test_interrupt_drops_everything_queued_and_later_speech_echoes_its_generation(loop) -> None:
    worker, outbox = loop
    ring = worker.open_session("a", slots=4)
    worker.handle(AudioChunk("a", 0, "u", speech(2.0)))
    worker.render_batch()
    before = frames(outbox)
    assert len(before) == 4 and {f.generation for f in before} == {0}
    worker.handle(Interrupt("a"))
    for f in before:  # what the server does with frames it will never show
        ring.release(f.slot)
    assert worker.render_batch() == 0  # nothing of "u" is left to render
    worker.handle(AudioChunk("a", 1, "v", speech(0.2), final=True))
    while worker.render_batch():
        for f in frames(outbox)[len(before) :]:
            ring.release(f.slot)
    after = frames(outbox)[len(before) :]
    assert {f.utterance_id for f in after} == {"v"} and {f.generation for f in after} == {1}
    assert len(after) == 5 and after[-1].last


def test_session_with_no_speech_costs_no_rendering(loop) -> None:
    worker, _outbox = loop
    worker.open_session("idle")
    assert worker.render_batch() == 0
    assert worker.frames_rendered == 0


def test_offline_job_waits_for_live_sessions_then_writes_the_mp4(loop, tmp_path) -> None:
    import av

    from pipeline.messages import GenerateVideo, JobDone
    from tests.support.media_analysis import wav_bytes

    worker, outbox = loop
    audio = tmp_path / "a.wav"
    audio.write_bytes(wav_bytes(to_float(speech(0.5))))
    worker.handle(GenerateVideo("job1", "default", str(audio), str(tmp_path / "out.mp4")))
    worker.open_session("live")
    worker.handle(AudioChunk("live", 0, "u", speech(0.2), final=True))
    assert worker.render_batch() > 0  # live frames first; the run loop steps jobs only when this is 0
    while worker.render_batch():
        pass
    while worker.step_job():
        pass
    done = [m for m in outbox if isinstance(m, JobDone)]
    assert len(done) == 1 and done[0].ok, done
    result = done[0].result
    assert result is not None and result.frames == int(np.ceil(0.5 * 25))
    with av.open(str(tmp_path / "out.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == result.frames


def test_failed_offline_job_reports_and_leaves_the_worker_running(loop, tmp_path) -> None:
    from pipeline.messages import GenerateVideo, JobDone

    worker, outbox = loop
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    worker.handle(GenerateVideo("job2", "default", str(tmp_path / "bad.wav"), str(tmp_path / "x.mp4")))
    worker.handle(GenerateVideo("job3", "nobody", str(tmp_path / "bad.wav"), str(tmp_path / "y.mp4")))
    while worker.step_job():
        pass
    done = {m.job_id: m for m in outbox if isinstance(m, JobDone)}
    assert not done["job2"].ok and "audio" in done["job2"].error
    assert not done["job3"].ok and "not prepared" in done["job3"].error
    assert not (tmp_path / "x.mp4").exists()


def test_a_cancelled_job_stops_and_leaves_no_partial_file(loop, tmp_path) -> None:
    from pipeline.messages import CancelJob, GenerateVideo, JobDone
    from tests.support.media_analysis import wav_bytes

    worker, outbox = loop
    (tmp_path / "a.wav").write_bytes(wav_bytes(to_float(speech(3.0))))
    worker.handle(GenerateVideo("job9", "default", str(tmp_path / "a.wav"), str(tmp_path / "out.mp4")))
    for _ in range(20):  # until the encoder has written something: a partial file exists
        assert worker.step_job()
        if list(tmp_path.glob("out.part.mp4")) and (tmp_path / "out.part.mp4").stat().st_size:
            break
    assert (tmp_path / "out.part.mp4").stat().st_size > 0
    worker.handle(CancelJob("job9", "cancelled by the test"))
    done = [m for m in outbox if isinstance(m, JobDone)]
    assert len(done) == 1 and done[0].result is None and done[0].error == "cancelled by the test"
    assert not worker.jobs and not list(tmp_path.glob("out*.mp4"))
