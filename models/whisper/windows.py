"""MuseTalk's audio feature per video frame: a window of encoder states.

What MuseTalk feeds its UNet per video frame (25 fps) is a window of Whisper encoder
states (50 steps a second, 20 ms each): the 10 steps from -80 ms to +120 ms around the
frame (steps 2f-4 ... 2f+5), each carrying 5 hidden states of 384 -> 50 x 384, plus a
sinusoidal positional encoding over those 50 rows (``models.positional``).

The two releases pad the windows differently at an utterance's edges: v1.0 repeats the
edge step for indices before the first or after the last step; v1.5 uses zeros for
indices outside the audio. Every sample of audio lands in a frame (``ceil(samples / 640)``
frames), the last partial one included.
"""
from __future__ import annotations

import torch

from media.pcm import FloatPcm
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for_samples
from models.positional import sinusoid_table

from .encoder import N_STATES, WhisperAudioEncoder
from .mel import STEP_SAMPLES
from .streaming import DEFAULT_CONFIG, StreamConfig, WhisperStepStream

STEPS_PER_FRAME = SAMPLES_PER_FRAME // STEP_SAMPLES  # 2
WINDOW_BEFORE = 4  # steps before the frame's first step (-80 ms)
WINDOW_STEPS = 10  # steps per frame window


def window_indices(frame: int) -> range:
    """Encoder steps of video frame ``frame``'s window: -80 ms ... +120 ms around it."""
    first = STEPS_PER_FRAME * frame - WINDOW_BEFORE
    return range(first, first + WINDOW_STEPS)


def resolve_step(index: int, total_steps: int, version: str) -> int | None:
    """Which step fills window slot ``index``: v1.0 repeats the edge steps, v1.5 pads
    with zeros (None)."""
    if 0 <= index < total_steps:
        return index
    if version == "v1":
        return min(max(index, 0), max(total_steps - 1, 0))
    return None


def lookahead_s(config: StreamConfig) -> float:
    """The most audio past a frame needed before its feature exists: the reach of the
    frame's window (+120 ms) plus the encoder window's ``hop + right``."""
    return (config.hop + config.right + WINDOW_STEPS - WINDOW_BEFORE) * STEP_SAMPLES / SAMPLE_RATE


class FrameFeatureStream:
    """Per-utterance MuseTalk features: PCM in, one (50, 384) tensor per video frame out
    (positional encoding added, in the model dtype, on the model's device)."""

    def __init__(self, encoder: WhisperAudioEncoder, version: str, config: StreamConfig = DEFAULT_CONFIG,
                 dtype: torch.dtype | None = None) -> None:
        self.steps = WhisperStepStream(encoder, version, config)
        self.version = version
        self.dtype = dtype or encoder.conv1.weight.dtype
        self._pe = sinusoid_table(WINDOW_STEPS * N_STATES, encoder.dims.n_audio_state).to(self.steps.device)
        self._buffer: torch.Tensor | None = None  # steps from _base on
        self._base = 0
        self._next_frame = 0
        self._flushed = False

    def push(self, pcm: FloatPcm) -> list[torch.Tensor]:
        self._add(self.steps.push(pcm))
        have = self._base + (0 if self._buffer is None else self._buffer.shape[0])
        # a frame is ready when its window's last step (2f + 5) exists
        ready = (have - (WINDOW_STEPS - WINDOW_BEFORE)) // STEPS_PER_FRAME + 1
        return self._emit(max(ready, 0), total_steps=None)

    def flush(self) -> list[torch.Tensor]:
        if self._flushed:
            return []
        self._flushed = True
        self._add(self.steps.finish())
        return self._emit(frames_for_samples(self.steps.samples), total_steps=self.steps.total_steps())

    def _add(self, states: torch.Tensor) -> None:
        if states.shape[0]:
            self._buffer = states if self._buffer is None else torch.cat([self._buffer, states])

    def _emit(self, upto: int, total_steps: int | None) -> list[torch.Tensor]:
        if upto <= self._next_frame or self._buffer is None:
            return []
        total = total_steps if total_steps is not None else 1 << 30  # no end known yet
        rows = [
            [-1 if (src := resolve_step(i, total, self.version)) is None else src - self._base for i in window_indices(f)]
            for f in range(self._next_frame, upto)
        ]
        # one gather for all ready frames; index -1 picks the zero row appended at the end
        padded = torch.cat([self._buffer, torch.zeros_like(self._buffer[:1])])
        index = torch.tensor(rows, device=padded.device).remainder_(padded.shape[0])
        windows = padded[index].reshape(len(rows), WINDOW_STEPS * N_STATES, -1)
        features = (windows.float() + self._pe).to(self.dtype)
        self._next_frame = upto
        # keep only the steps later frames can still use
        keep_from = max(0, STEPS_PER_FRAME * self._next_frame - WINDOW_BEFORE - 1)
        if total_steps is None and keep_from > self._base:
            drop = min(keep_from - self._base, self._buffer.shape[0] - 1)
            self._buffer = self._buffer[drop:]
            self._base += drop
        return list(features.unbind(0))
