"""``LipSyncVideoService`` in a real pipecat pipeline against a real server.

Recorded TTS frames (speech-like PCM at 24 kHz in 20 ms pieces between TTSStartedFrame and
TTSStoppedFrame, fed at real time as a TTS service produces them) go through the service;
what comes out at the end of the pipeline is what the bot's transport would play and show.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from lipsync_pipecat import LipSyncVideoService
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from server_fixture import ServerProcess

RATE = 24000  # the TTS's rate and the pipeline's output rate
PIECE_S = 0.02
LOUD = 64  # int16 peak above which a piece is sound, as in the service


def speech_like(seconds: float, seed: int = 1) -> np.ndarray:
    """Syllables of a voiced, gliding harmonic tone with varied lengths and gaps, and one long
    pause in the middle: an envelope that is not periodic, so correlation finds one lag."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    total = int(seconds * RATE)
    n = 0
    paused = False
    while n < total:
        syl = int(rng.uniform(0.12, 0.3) * RATE)
        t = np.arange(syl) / RATE
        f0 = rng.uniform(100, 170) + 30 * t / t[-1]
        phase = 2 * np.pi * np.cumsum(f0) / RATE
        tone = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = np.sin(np.pi * np.arange(syl) / syl) ** 0.5
        out.append(0.3 * tone * env * rng.uniform(0.5, 1.0))
        gap = 0.35 if not paused and n > total / 2 else rng.uniform(0.03, 0.1)
        paused = paused or gap == 0.35
        out.append(np.zeros(int(gap * RATE)))
        n += syl + int(gap * RATE)
    pcm = np.concatenate(out)[:total]
    return np.clip(pcm * 32767, -32768, 32767).astype(np.int16)


class Sink(FrameProcessor):
    """The end of the pipeline: where the bot's transport would be. Keeps every frame with its
    arrival time."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def audio(self, after: float = 0.0) -> list[tuple[float, np.ndarray]]:
        return [(t, np.frombuffer(f.audio, np.int16)) for t, f in self.frames if isinstance(f, TTSAudioRawFrame) and t >= after]

    def video(self, after: float = 0.0, before: float = float("inf")) -> list[tuple[float, np.ndarray]]:
        out = []
        for t, f in self.frames:
            if isinstance(f, OutputImageRawFrame) and after <= t < before:
                w, h = f.size
                out.append((t, np.frombuffer(f.image, np.uint8).reshape(h, w, 3)))
        return out


@dataclass
class Run:
    worker: PipelineWorker
    sink: Sink
    service: LipSyncVideoService
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    feed_late: float = 0.0  # the most a piece was sent after its time (this machine's load)

    async def feed(self, pcm: np.ndarray, stop: asyncio.Event | None = None, speed: float = 1.0) -> None:
        """TTS frames at ``speed`` × real time: started, 20 ms pieces, stopped (unless ``stop`` is set)."""
        await self.worker.queue_frame(TTSStartedFrame())
        step = int(PIECE_S * RATE)
        t0 = time.monotonic()
        for i in range(0, len(pcm), step):
            if stop is not None and stop.is_set():
                return
            self.feed_late = max(self.feed_late, time.monotonic() - (t0 + i / RATE / speed))
            await self.worker.queue_frame(TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=RATE, num_channels=1))
            await asyncio.sleep(max(0.0, t0 + (i + step) / RATE / speed - time.monotonic()))
        await self.worker.queue_frame(TTSStoppedFrame())


@contextlib.asynccontextmanager
async def pipeline(server: ServerProcess) -> AsyncIterator[Run]:
    service = LipSyncVideoService(server.url)
    sink = Sink()
    worker = PipelineWorker(Pipeline([service, sink]), cancel_on_idle_timeout=False,
                            params=PipelineParams(audio_out_sample_rate=RATE))
    run = Run(worker, sink, service)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    @service.event_handler("on_playback_started")
    async def _playback_started(service: LipSyncVideoService, segment: Any) -> None:
        run.events.append((time.monotonic(), "playback_started", {"segment": segment}))

    @service.event_handler("on_playback_finished")
    async def _playback_finished(service: LipSyncVideoService, segment: Any, position: float, interrupted: bool) -> None:
        run.events.append((time.monotonic(), "playback_finished",
                           {"segment": segment, "playback_position": position, "interrupted": interrupted}))

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(started.wait(), 60)
        assert service.session_id, "no session opened (see the log for the service's error)"
        yield run
    finally:
        await worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(task, 30)
        except asyncio.TimeoutError:
            await worker.cancel()
            await asyncio.wait_for(task, 10)


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def mouth_motion(frames: list[tuple[float, np.ndarray]]) -> float:
    """Mean absolute change between successive frames around the default avatar's mouth (the
    astronaut portrait: the lower middle of her face, a quarter to two fifths down the frame).
    Elsewhere only the video codec's noise changes, and the eyes when she blinks."""
    if len(frames) < 2:
        return 0.0
    h, w, _ = frames[0][1].shape
    crops = [f[int(h * 0.25):int(h * 0.4), int(w * 0.36):int(w * 0.52)].astype(np.float32) for _, f in frames]
    return float(np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(crops)]))


def envelope(pcm: np.ndarray, hop: int = RATE // 100) -> np.ndarray:
    n = len(pcm) // hop
    x = pcm[: n * hop].astype(np.float64).reshape(n, hop)
    return np.sqrt((x**2).mean(axis=1))


def trim(pcm: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)
    return pcm[loud[0]: loud[-1] + 1] if len(loud) else pcm[:0]


def longest_silence(pcm: np.ndarray) -> float:
    """The longest run of 10 ms hops without sound, in seconds."""
    loud = envelope(pcm) > LOUD / 4
    best = run = 0
    for x in loud:
        run = 0 if x else run + 1
        best = max(best, run)
    return best / 100


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 20) -> tuple[float, int]:
    """The highest Pearson r of two envelopes over lags of ±max_lag hops, and that lag."""
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        if n > 10:
            r = float(np.corrcoef(x[:n], y[:n])[0, 1])
            best = max(best, (r, lag))
    return best


async def test_video_frames_come_out(server: ServerProcess) -> None:
    async with pipeline(server) as run:
        await wait_for(lambda: run.sink.video(), 30, "the first video frame")
        t0 = time.monotonic()
        await asyncio.sleep(3.0)
        frames = run.sink.video(after=t0, before=time.monotonic())
    fps = len(frames) / 3.0
    w, h = run.sink.video()[0][1].shape[1], run.sink.video()[0][1].shape[0]
    print(f"video: {fps:.1f} fps, {w}x{h}")
    assert 20 <= fps <= 30, f"{fps:.1f} fps, the server sends 25"
    first = next(f for _, f in run.sink.frames if isinstance(f, OutputImageRawFrame))
    assert first.format == "RGB" and len(first.image) == first.size[0] * first.size[1] * 3


# real time, and a TTS that produces four times faster than it is spoken (the server buffers;
# the avatar still speaks at its own pace)
@pytest.mark.parametrize("speed", [1.0, 4.0], ids=["real-time", "burst"])
async def test_audio_comes_back_whole_in_order_and_the_mouth_moves(server: ServerProcess, speed: float) -> None:
    pcm = speech_like(3.0)
    async with pipeline(server) as run:
        await wait_for(lambda: len(run.sink.video()) > 25, 30, "a second of video")
        idle_from = time.monotonic()
        await asyncio.sleep(1.5)
        idle = run.sink.video(after=idle_from)
        assert not run.sink.audio(), "audio came out before any was sent (idle silence must not be pushed)"
        t_feed = time.monotonic()
        await run.feed(pcm, speed=speed)
        await wait_for(lambda: any(e[1] == "playback_finished" for e in run.events), 10, "playback_finished")
        await asyncio.sleep(1.0)  # the tail, and idle after it

    out = run.sink.audio()
    assert out, f"no audio came back; events {run.events}"
    audio = np.concatenate([a for _, a in out])
    assert {f.sample_rate for _, f in run.sink.frames if isinstance(f, TTSAudioRawFrame)} == {RATE}
    sent, got = trim(pcm), trim(audio)
    first_audio = out[0][0]
    print(f"audio: sent {len(sent) / RATE:.3f} s, got {len(got) / RATE:.3f} s (pushed {len(audio) / RATE:.3f} s); "
          f"first audio {first_audio - t_feed:.3f} s after the first piece; pieces sent up to {1000 * run.feed_late:.0f} ms late")
    print(f"events {[(round(t - t_feed, 3), k, d) for t, k, d in run.events]}")
    r, lag = best_correlation(envelope(sent), envelope(got))
    print(f"envelope correlation r={r:.3f} at lag {lag * 10} ms; longest silence sent {longest_silence(sent):.3f} s, "
          f"came back {longest_silence(got):.3f} s")
    # whole: the span from first to last sound within two video frames of what was sent (no
    # gap inserted, nothing lost), and little silence pushed around it
    assert abs(len(got) - len(sent)) / RATE <= 0.08
    assert len(audio) / RATE <= len(sent) / RATE + 0.2
    # in order: the loudness envelopes line up
    assert r >= 0.8
    # events
    kinds = [k for _, k, _ in run.events]
    assert kinds[:1] == ["playback_started"] and "playback_finished" in kinds
    finished = next(d for _, k, d in run.events if k == "playback_finished")
    assert finished["interrupted"] is False
    # the mouth: moves more while the voice comes out than while idle
    speaking = run.sink.video(after=out[0][0], before=out[-1][0])
    motion_idle, motion_speaking = mouth_motion(idle), mouth_motion(speaking)
    print(f"mouth motion: idle {motion_idle:.2f}, speaking {motion_speaking:.2f} (mean |Δ| per pixel)")
    assert motion_speaking > 2 * motion_idle + 0.5


async def test_interruption_stops_voice_and_mouth(server: ServerProcess) -> None:
    pcm = speech_like(5.0, seed=2)
    stop = asyncio.Event()
    async with pipeline(server) as run:
        await wait_for(lambda: len(run.sink.video()) > 25, 30, "a second of video")
        feeding = asyncio.create_task(run.feed(pcm, stop))
        # interrupt once a second of the avatar's voice has come out
        await wait_for(lambda: sum(len(a) for _, a in run.sink.audio()) >= RATE, 10, "a second of audio out")
        speaking_from = run.sink.audio()[0][0]
        t_int = time.monotonic()
        stop.set()
        await run.worker.queue_frame(InterruptionFrame())
        await feeding
        await wait_for(lambda: any(e[1] == "playback_finished" for e in run.events), 5, "playback_finished")
        await asyncio.sleep(2.0)

    after = [(t, a) for t, a in run.sink.audio(after=t_int) if np.abs(a.astype(np.int32)).max() > LOUD]
    last = max((t for t, _ in after), default=t_int)
    finished = [(t, d) for t, k, d in run.events if k == "playback_finished"]
    print(f"interruption: last sound {1000 * (last - t_int):.0f} ms after it; playback_finished "
          f"{[(round(1000 * (t - t_int)), d) for t, d in finished]}")
    assert last - t_int <= 0.2
    assert finished and finished[0][1]["interrupted"] is True
    assert 0.5 < finished[0][1]["playback_position"] < 5.0
    # the mouth stops too: after a moment it moves as little as when idle
    motion_speaking = mouth_motion(run.sink.video(after=speaking_from, before=t_int))
    motion_after = mouth_motion(run.sink.video(after=t_int + 0.4, before=t_int + 1.9))
    print(f"mouth motion: speaking {motion_speaking:.2f}, after the interruption {motion_after:.2f}")
    assert motion_after < 0.5 * motion_speaking
    # and nothing more comes out after it, though the TTS had four more seconds
    assert not [a for t, a in run.sink.audio(after=t_int + 0.5) if np.abs(a.astype(np.int32)).max() > LOUD]


@pytest.fixture(autouse=True)
def _server_log_on_failure(request: pytest.FixtureRequest, server: ServerProcess) -> Any:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- server log ----\n" + server.log())
