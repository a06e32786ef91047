"""Messages that cross the process boundary between the server and the inference worker.

Only small things travel here: session ids, PCM chunks, slot numbers. Frames never do;
they live in the session's shared-memory ring (see ``frame_ring``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SAMPLE_RATE = 16_000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: the 40 ms of audio each video frame carries


# ---- server -> worker -------------------------------------------------------------


@dataclass(frozen=True)
class OpenSession:
    session_id: str
    avatar: str
    ring_name: str
    ring_slots: int
    frame_shape: tuple[int, int, int]  # (height, width, 3), RGB uint8


@dataclass(frozen=True)
class CloseSession:
    session_id: str


@dataclass(frozen=True)
class AudioChunk:
    """PCM for one utterance, in order. ``pcm`` is int16 mono at 16 kHz, any length.

    ``start_cursor`` is only read on an utterance's first chunk: the avatar frame index the
    server expects to be showing when the first speaking frame is played, so speech
    continues the idle motion without a jump.
    """

    session_id: str
    generation: int
    utterance_id: str
    pcm: bytes
    final: bool = False
    start_cursor: int = 0


@dataclass(frozen=True)
class Interrupt:
    """Drop everything queued for the session with a generation below ``generation``."""

    session_id: str
    generation: int


@dataclass(frozen=True)
class GenerateVideo:
    """Offline job: lip-sync ``audio_path`` onto ``avatar`` into ``out_path`` (mp4), with
    the worker's engine, between real-time batches."""

    job_id: str
    avatar: str
    audio_path: str
    out_path: str


@dataclass(frozen=True)
class ForgetAvatar:
    """The avatar was prepared again: load it afresh for new sessions and jobs."""

    avatar: str


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- worker -> server -------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    engine: str
    pid: int
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class FrameReady:
    """One rendered speaking frame sits in ``slot`` of the session's ring.

    ``audio`` is exactly the 40 ms (640 samples, int16 16 kHz) that this frame shows.
    ``cursor`` is the idle-loop position the frame was drawn at (``avatar_index`` =
    ``avatar.idle_index(cursor)``), so idle motion resumes where speech left it.
    ``last`` marks the final frame of the utterance.
    """

    session_id: str
    generation: int
    utterance_id: str
    seq: int
    slot: int
    avatar_index: int
    cursor: int
    audio: bytes
    last: bool = False


@dataclass(frozen=True)
class WorkerError:
    session_id: str
    message: str
    utterance_id: str = ""


@dataclass(frozen=True)
class JobDone:
    job_id: str
    ok: bool
    result: dict = field(default_factory=dict)  # frames, duration, path
    error: str = ""


@dataclass(frozen=True)
class WorkerStats:
    """Periodic counters, for the benchmark and /stats."""

    frames_rendered: int
    batches: int
    render_seconds: float
    max_batch: int
