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


def to_float(pcm: Pcm) -> FloatPcm:
    """``Pcm`` to float32 in -1..1 (what feature extractors take)."""
    return np.asarray(pcm, np.int16).astype(np.float32) / np.float32(FULL_SCALE)


def as_pcm(samples: npt.ArrayLike) -> Pcm:
    """``samples`` as ``Pcm``: int16 passes through, floats are converted."""
    x = np.asarray(samples)
    if x.dtype == np.int16:
        return x.reshape(-1)
    if np.issubdtype(x.dtype, np.floating):
        return from_float(x)
    raise TypeError(f"PCM must be int16 or float samples, got {x.dtype}")


def silence(samples: int = SAMPLES_PER_FRAME) -> Pcm:
    return np.zeros(samples, np.int16)


SILENT_FRAME: Pcm = silence()
SILENT_FRAME.setflags(write=False)  # shared by every idle frame: nobody may write into it
