"""The one PCM sample type, and the conversions into and out of it.

Speech crosses every boundary of the project (TTS -> speech feeder -> worker -> player ->
tracks, recorder and mp4) as ``Pcm``: mono signed 16-bit samples at ``SAMPLE_RATE`` in a
NumPy array. Float audio exists only inside a stage (a TTS backend's resampler, an
engine's feature extractor) and is converted here, at the edge of that stage.
"""
from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from media.timing import SAMPLES_PER_FRAME

Pcm: TypeAlias = npt.NDArray[np.int16]  # mono, SAMPLE_RATE, s16
FloatPcm: TypeAlias = npt.NDArray[np.float32]  # mono, SAMPLE_RATE, -1..1

PCM_DTYPE = np.dtype(np.int16)
FULL_SCALE = 32768.0


def from_float(samples: npt.ArrayLike) -> Pcm:
    """Float audio in -1..1 (clipped outside) to ``Pcm``."""
    x = np.asarray(samples, np.float32).reshape(-1)
    return np.clip(np.rint(x * FULL_SCALE), -32768, 32767).astype(np.int16)


def saturate(samples: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    """Float samples already in int16 units (a filter's output) to s16, rounded and clipped."""
    return np.clip(np.rint(samples), -32768, 32767).astype(np.int16)


def to_float(pcm: Pcm) -> FloatPcm:
    """``Pcm`` to float32 in -1..1 (what feature extractors take)."""
    return np.asarray(pcm, np.int16).astype(np.float32) / np.float32(FULL_SCALE)


def silence(samples: int = SAMPLES_PER_FRAME) -> Pcm:
    return np.zeros(samples, np.int16)


SILENT_FRAME: Pcm = silence()
SILENT_FRAME.setflags(write=False)  # shared by every idle frame: nobody may write into it


class PcmFifo:
    """Samples in, fixed-size pieces out, in order: the worker cuts each utterance's audio
    into the 40 ms every frame carries. Appending and taking cost O(piece), however long
    the utterance (no re-concatenation of what is queued)."""

    def __init__(self) -> None:
        self._chunks: list[Pcm] = []
        self._offset = 0  # samples of _chunks[0] already taken
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, pcm: Pcm) -> None:
        if pcm.size:
            self._chunks.append(pcm)
            self._size += pcm.size

    def take(self, n: int) -> Pcm:
        """The next ``n`` samples, zero-padded when fewer are queued."""
        out = np.zeros(n, np.int16)
        filled = 0
        while filled < n and self._chunks:
            head = self._chunks[0]
            part = head[self._offset : self._offset + n - filled]
            out[filled : filled + part.size] = part
            filled += part.size
            self._offset += part.size
            if self._offset >= head.size:
                self._chunks.pop(0)
                self._offset = 0
        self._size -= filled
        return out

    def clear(self) -> None:
        self._chunks.clear()
        self._offset = self._size = 0
