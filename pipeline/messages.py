"""Messages that cross the process boundary between the server and the inference worker.

Two closed unions, one per direction: ``ToWorker`` and ``FromWorker``. Each side
dispatches them with ``match``, so a new message is a type error until both ends handle
it. Only small things travel here: session ids, PCM chunks, slot numbers. Frames never
do; they live in the session's shared-memory ring (see ``frame_ring``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from media.pcm import Pcm
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME

FrameShape: TypeAlias = tuple[int, int, int]  # (height, width, 3), RGB uint8

# ---- server -> worker -------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession:
    session_id: str
    avatar: str
    ring_name: str
    ring_slots: int
    frame_shape: FrameShape


@dataclass(frozen=True)
class CloseSession:
    session_id: str


@dataclass(frozen=True)
class AudioChunk:
    """PCM for one utterance, in order: mono s16 samples at ``sample_rate``, any length.

    The worker takes only the project's own rate (``media.timing.SAMPLE_RATE``); the
    server resamples before it sends. ``generation`` is the speech feeder's at the time
    of sending; the worker echoes it on every frame it renders from this audio.
    ``start_cursor`` is only read on an utterance's first chunk: the avatar frame index the
    server expects to be showing when the first speaking frame is played, so speech
    continues the idle motion without a jump.
    """

    session_id: str
    generation: int
    utterance_id: str
    pcm: Pcm
    sample_rate: int = SAMPLE_RATE
    final: bool = False
    start_cursor: int = 0

    def __post_init__(self) -> None:
        if self.pcm.dtype != np.int16 or self.pcm.ndim != 1:
            raise TypeError(f"AudioChunk.pcm must be mono int16 samples, got {self.pcm.dtype} {self.pcm.shape}")


@dataclass(frozen=True)
class Interrupt:
    """Drop everything queued or rendered-but-unsent for the session. Every chunk sent
    before this message is older (one FIFO queue), so the worker needs no counter of its own."""

    session_id: str


@dataclass(frozen=True)
class GenerateVideo:
    """Offline job: lip-sync ``audio_path`` onto ``avatar`` into ``out_path`` (mp4), with
    the worker's engine, between real-time batches."""

    job_id: str
    avatar: str
    audio_path: str
    out_path: str


@dataclass(frozen=True)
class CancelJob:
    """Stop an offline job (asked for, or past its time): its partial file is removed and a
    ``JobDone`` with the error answers it."""

    job_id: str
    reason: str


@dataclass(frozen=True)
class ForgetAvatar:
    """The avatar was prepared again: load it afresh for new sessions and jobs."""

    avatar: str


@dataclass(frozen=True)
class Shutdown:
    pass


ToWorker: TypeAlias = (
    OpenSession | CloseSession | AudioChunk | Interrupt | GenerateVideo | CancelJob | ForgetAvatar | Shutdown
)


# ---- worker -> server -------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    engine: str
    pid: int
    max_batch: int


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class FrameReady:
    """One rendered speaking frame sits in ``slot`` of the session's ring.

    ``audio`` is exactly the 40 ms (``SAMPLES_PER_FRAME`` samples) that this frame shows.
    ``cursor`` is the idle-loop position the frame was drawn at (``avatar_index`` =
    ``avatar.idle_index(cursor)``), so idle motion resumes where speech left it.
    ``generation`` is the one its audio was sent with. ``last`` marks the final frame of
    the utterance.
    """

    session_id: str
    generation: int
    utterance_id: str
    seq: int
    slot: int
    avatar_index: int
    cursor: int
    audio: Pcm
    last: bool = False

    def __post_init__(self) -> None:
        if self.audio.shape != (SAMPLES_PER_FRAME,) or self.audio.dtype != np.int16:
            raise TypeError(f"FrameReady.audio must be {SAMPLES_PER_FRAME} int16 samples, got {self.audio.dtype} {self.audio.shape}")


@dataclass(frozen=True)
class WorkerError:
    """Something failed. With a ``session_id``, that session's speech was dropped; without
    one, the worker could not start (the message says why)."""

    session_id: str
    message: str
    utterance_id: str = ""


@dataclass(frozen=True)
class VideoResult:
    path: str
    frames: int
    duration: float  # seconds, frames / FPS


@dataclass(frozen=True)
class JobDone:
    job_id: str
    result: VideoResult | None  # None when the job failed
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass(frozen=True)
class WorkerStats:
    """Periodic counters, for the benchmark and /stats."""

    frames_rendered: int
    batches: int
    render_seconds: float
    max_batch: int


@dataclass(frozen=True)
class Heartbeat:
    """The worker process is alive: sent from a thread of its own about twice a second,
    from before the engine loads until the process ends, whatever its loop is doing.
    ``busy_s`` is how long the loop has been in its current pass (or, before the loop
    exists, how long the worker has been starting): large while one render or job step
    runs long, which is slow work, not a hang. The client consumes these itself; its
    handler never sees them."""

    pid: int
    busy_s: float


FromWorker: TypeAlias = WorkerReady | SessionOpened | FrameReady | WorkerError | JobDone | WorkerStats | Heartbeat
