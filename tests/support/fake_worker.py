"""A stand-in for the inference worker, in the server's own process and event loop.

It speaks the real protocol (``pipeline.messages``) over the real shared-memory rings:
it records every message the server sends, opens and closes rings, turns each
utterance's audio into frames (one per 40 ms, painted a flat colour per utterance) written
into free slots, echoes each chunk's generation, honours backpressure and interrupts,
and can crash and come back the way ``WorkerClient`` does. What it does not do is lip
sync: that is the engines' tests' business.
"""
from __future__ import annotations

import asyncio
import os
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from media.decode import decode_audio
from media.mp4 import Mp4Writer
from media.pcm import PcmFifo
from media.timing import FPS, SAMPLES_PER_FRAME, frames_for_samples
from pipeline.client import WorkerHandler
from pipeline.frame_ring import FrameRing
from pipeline.messages import (
    AudioChunk,
    CancelJob,
    CloseSession,
    ForgetAvatar,
    FrameReady,
    FromWorker,
    GenerateVideo,
    Interrupt,
    JobDone,
    OpenSession,
    SessionOpened,
    Shutdown,
    ToWorker,
    VideoResult,
    WorkerReady,
)

PUMP_S = 0.004  # how often rendering is retried while rings are full


def colour_of(utterance_id: str) -> int:
    """The flat grey level the fake paints an utterance's frames with: 64 and up, 8 levels
    apart, so a video codec's rounding cannot turn one utterance into another or into idle."""
    return 64 + 8 * (zlib.crc32(utterance_id.encode()) % 24)


@dataclass
class _Utterance:
    id: str
    generation: int
    start_cursor: int
    pcm: PcmFifo = field(default_factory=PcmFifo)
    sent: int = 0
    final: bool = False

    def frames_ready(self) -> int:
        """Frames whose audio is all here, less one of look-ahead as the real engines keep
        (so the last frame always comes after the final chunk, and says so)."""
        available = self.sent * SAMPLES_PER_FRAME + len(self.pcm)
        if self.final:
            return frames_for_samples(available)
        return max(available // SAMPLES_PER_FRAME - 1, 0)


@dataclass
class _Session:
    ring: FrameRing
    utterances: deque[_Utterance] = field(default_factory=deque)
    cursor: int = 0


class FakeWorker:
    """A ``WorkerLink`` for ``SessionManager``; build it with ``FakeWorker.factory()``."""

    def __init__(self, handler: WorkerHandler, *, fail_open: bool = False, hold_jobs: bool = False, open_delay_s: float = 0.0) -> None:
        self.handler = handler
        self.fail_open = fail_open
        # an engine making its material for an avatar on first use: the open, and every
        # message behind it, waits this long (the real worker's inbox is one queue)
        self.open_delay_s = open_delay_s
        self.hold_jobs = hold_jobs  # jobs wait until cancelled (for timeouts and DELETE)
        self.sent: list[ToWorker] = []
        self.frames_sent = 0
        self._alive = False
        self._restarts = 0
        self._ready: WorkerReady | None = None
        self._sessions: dict[str, _Session] = {}
        self._inbox: asyncio.Queue[ToWorker] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    def factory(cls, **options: Any) -> tuple[list[FakeWorker], Callable[[WorkerHandler], FakeWorker]]:
        """(the workers built so far, a factory for ``create_app``)."""
        built: list[FakeWorker] = []

        def build(handler: WorkerHandler) -> FakeWorker:
            worker = cls(handler, **options)
            built.append(worker)
            return worker

        return built, build

    # ---- WorkerLink ----
    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int | None:
        return os.getpid() if self._alive else None

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def ready_info(self) -> WorkerReady | None:
        return self._ready

    async def start(self) -> WorkerReady:
        self._alive = True
        self._inbox = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._run())
        self._ready = WorkerReady("fake", os.getpid(), 8)
        return self._ready

    def send(self, msg: ToWorker) -> None:
        self.sent.append(msg)
        if self._alive:
            self._inbox.put_nowait(msg)

    async def stop(self, timeout: float = 5.0) -> None:
        self._alive = False
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        for session in self._sessions.values():
            session.ring.close()
        self._sessions.clear()

    # ---- test controls ----
    def of_type(self, kind: type[ToWorker]) -> list[ToWorker]:
        return [m for m in self.sent if isinstance(m, kind)]

    async def crash_and_restart(self) -> None:
        """What ``WorkerClient`` does when its process dies: a new worker, then the handler told."""
        await self.stop()
        self._restarts += 1
        await self.start()
        await self.handler.on_worker_restart()

    # ---- the worker's side ----
    def _reply(self, msg: FromWorker) -> None:
        self.handler.on_worker_message(msg)

    async def _run(self) -> None:
        # Polls rather than awaiting the queue with a timeout: on Python 3.11 wait_for can
        # swallow the cancellation that stop() sends.
        while True:
            while not self._inbox.empty():
                msg = self._inbox.get_nowait()
                if isinstance(msg, OpenSession) and self.open_delay_s:
                    await asyncio.sleep(self.open_delay_s)
                self._handle(msg)
            self._render()
            await asyncio.sleep(PUMP_S)

    def _handle(self, msg: ToWorker) -> None:
        match msg:
            case OpenSession():
                if self.fail_open:
                    self._reply(SessionOpened(msg.session_id, ok=False, error="the fake was told to fail"))
                    return
                ring = FrameRing.attach(msg.ring_name, msg.ring_slots, msg.frame_shape)
                old = self._sessions.pop(msg.session_id, None)
                if old is not None:
                    old.ring.close()
                self._sessions[msg.session_id] = _Session(ring)
                self._reply(SessionOpened(msg.session_id, ok=True))
            case CloseSession():
                closed = self._sessions.pop(msg.session_id, None)
                if closed is not None:
                    closed.ring.close()
            case AudioChunk():
                session = self._sessions.get(msg.session_id)
                if session is None:
                    return
                last = session.utterances[-1] if session.utterances else None
                if last is None or last.id != msg.utterance_id:
                    last = _Utterance(msg.utterance_id, msg.generation, msg.start_cursor)
                    session.utterances.append(last)
                last.pcm.append(msg.pcm)
                last.final = last.final or msg.final
            case Interrupt():
                session = self._sessions.get(msg.session_id)
                if session is not None:
                    session.utterances.clear()
            case GenerateVideo():
                if not self.hold_jobs:
                    self._reply(self._job(msg))
            case CancelJob():
                if self.hold_jobs:
                    self._reply(JobDone(msg.job_id, None, error=msg.reason))
            case ForgetAvatar() | Shutdown():
                pass

    def _render(self) -> None:
        for session_id, session in self._sessions.items():
            while session.utterances:
                utt = session.utterances[0]
                if utt.sent >= utt.frames_ready():
                    if utt.final:
                        session.utterances.popleft()
                        continue
                    break
                slot = session.ring.acquire()
                if slot is None:
                    break  # backpressure: the server has not shown what is there yet
                session.ring.view(slot)[:] = colour_of(utt.id)
                session.ring.publish(slot)
                seq = utt.sent
                utt.sent += 1
                cursor = utt.start_cursor + seq
                audio = utt.pcm.take(SAMPLES_PER_FRAME)
                last = utt.final and utt.sent == utt.frames_ready()
                self.frames_sent += 1
                self._reply(FrameReady(session_id, utt.generation, utt.id, seq, slot, 0, cursor, audio, last))

    def _job(self, msg: GenerateVideo) -> JobDone:
        try:
            pcm = decode_audio(msg.audio_path)
        except Exception as exc:
            return JobDone(msg.job_id, None, error=str(exc))
        frames = frames_for_samples(pcm.size)
        with Mp4Writer(msg.out_path, 64, 64) as writer:
            image = np.full((64, 64, 3), colour_of(msg.job_id), np.uint8)
            for i in range(frames):
                writer.write(image, pcm[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME])
        return JobDone(msg.job_id, VideoResult(msg.out_path, frames, frames / FPS))
