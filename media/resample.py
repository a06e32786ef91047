"""Raw s16le PCM at any rate and channel count in, the project's ``Pcm`` out, streamed.

A voice agent's TTS arrives as byte pieces of any size (24 kHz stereo, 48 kHz mono...):
libswresample keeps its filter state from one piece to the next, so piece boundaries
leave no clicks, and a sample (or a stereo pair) split across two pieces is carried over.
"""
from __future__ import annotations

import av
import numpy as np

from media.pcm import Pcm
from media.timing import SAMPLE_RATE

CHANNELS = (1, 2)
_EMPTY: Pcm = np.zeros(0, np.int16)
_LAYOUTS = {1: "mono", 2: "stereo"}


class StreamResampler:
    """Interleaved s16le at ``rate`` Hz with ``channels`` channels -> mono 16 kHz ``Pcm``."""

    def __init__(self, rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if rate < 1:
            raise ValueError(f"sample_rate must be positive, got {rate}")
        if channels not in CHANNELS:
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.rate = rate
        self.channels = channels
        self._frame_bytes = 2 * channels
        self._partial = b""  # the bytes of a sample frame split across two pieces
        self._pts = 0
        # 16 kHz mono in needs nothing; anything else goes through swresample (which downmixes too)
        self._av: av.AudioResampler | None = None
        if (rate, channels) != (SAMPLE_RATE, 1):
            self._av = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

    def feed(self, data: bytes) -> Pcm:
        data = self._partial + data if self._partial else data
        whole = len(data) - len(data) % self._frame_bytes
        self._partial = data[whole:]
        if not whole:
            return _EMPTY
        samples = np.frombuffer(data[:whole], "<i2").astype(np.int16)
        if self._av is None:
            return samples
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=_LAYOUTS[self.channels])
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += samples.size // self.channels
        return _collect(self._av.resample(frame))

    def flush(self) -> Pcm:
        """The filter's tail (a few ms held back for its look-ahead); the resampler starts
        afresh after it. A dangling partial sample is dropped."""
        self._partial = b""
        if self._av is None:
            return _EMPTY
        out = _collect(self._av.resample(None))
        self._av = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._pts = 0
        return out


def _collect(frames: list[av.AudioFrame]) -> Pcm:
    out = [f.to_ndarray().reshape(-1) for f in frames]
    return np.concatenate(out).astype(np.int16, copy=False) if out else _EMPTY
