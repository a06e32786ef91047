"""Audio files (wav, mp3, ogg, m4a, flac, ...) to 16 kHz mono int16 with PyAV (no ffmpeg
binary needed): uploads to /humanaudio and offline generation both come through here."""
from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np

from media.pcm import Pcm
from media.timing import SAMPLE_RATE

MIN_SAMPLE_RATE = 8000  # Hz: telephone speech; anything lower is not speech audio


class AudioDecodeError(ValueError):
    pass


def probe_seconds(path: Path | str) -> float | None:
    """How long the audio in ``path`` says it is (from its headers: no decoding), or None."""
    try:
        with av.open(str(path), mode="r") as container:
            if container.duration is not None:
                return float(container.duration / av.time_base)
            streams = container.streams.audio
            if streams and streams[0].duration is not None and streams[0].time_base is not None:
                return float(streams[0].duration * streams[0].time_base)
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return None


def decode_audio(source: bytes | Path | str, max_seconds: float = 600.0) -> Pcm:
    """All of the first audio stream of ``source`` (file bytes or a path) as int16 mono at 16 kHz."""
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise AudioDecodeError(f"not a readable audio file: {exc}") from None
    with container:
        streams = container.streams.audio
        if not streams:
            raise AudioDecodeError("the file has no audio stream")
        rate = streams[0].codec_context.sample_rate or 0
        if rate < MIN_SAMPLE_RATE:
            # a 1 Hz "WAV" of a kilobyte would otherwise decode to minutes of speech
            raise AudioDecodeError(f"its sample rate is {rate} Hz; speech needs at least {MIN_SAMPLE_RATE} Hz")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        limit = int(max_seconds * SAMPLE_RATE)
        try:
            for frame in container.decode(streams[0]):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += chunk.size
                if total > limit:
                    raise AudioDecodeError(f"the audio is longer than {max_seconds:.0f} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise AudioDecodeError(f"the audio could not be decoded: {exc}") from None
    if not chunks:
        raise AudioDecodeError("the file contains no audio samples")
    pcm = np.concatenate(chunks).astype(np.int16, copy=False)
    if pcm.size == 0:
        raise AudioDecodeError("the file contains no audio samples")
    return pcm
