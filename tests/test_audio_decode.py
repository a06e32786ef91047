"""Uploaded audio in the common formats decodes to 16 kHz mono; anything else is refused clearly."""
from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from media.decode import AudioDecodeError, decode_audio


def encode(tmp_path, fmt: str, codec: str, seconds: float = 1.0, rate: int = 44_100) -> bytes:
    """A 440 Hz stereo tone written with PyAV in the given container and codec."""
    path = tmp_path / f"a.{fmt}"
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = "stereo"
        # the resampler gives each codec its own sample format and frame size
        resampler = av.AudioResampler(format=s.codec_context.format.name, layout="stereo", rate=rate,
                                      frame_size=s.codec_context.frame_size or None)
        src = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        src.sample_rate = rate
        src.pts = 0
        src.time_base = fractions.Fraction(1, rate)
        for f in [*resampler.resample(src), *resampler.resample(None)]:
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path.read_bytes()


@pytest.mark.parametrize(
    ("fmt", "codec", "rate"),
    [
        ("wav", "pcm_s16le", 44_100), ("mp3", "libmp3lame", 44_100), ("ogg", "libopus", 48_000),
        ("m4a", "aac", 44_100), ("flac", "flac", 22_050),
    ],
)
def test_common_formats_decode_to_16k_mono_of_the_right_length(tmp_path, fmt: str, codec: str, rate: int) -> None:
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"this PyAV build cannot write {codec}")
    pcm = decode_audio(encode(tmp_path, fmt, codec, rate=rate))
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert abs(pcm.size / 16_000 - 1.0) < 0.08, pcm.size
    assert np.abs(pcm.astype(np.float32) / 32768).max() > 0.3


@pytest.mark.parametrize("data", [b"", b"plain text, not audio" * 50, b"RIFF\x10\x00\x00\x00WAVEfmt "])
def test_non_audio_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(AudioDecodeError):
        decode_audio(data)


def test_audio_longer_than_the_limit_is_refused(tmp_path) -> None:
    with pytest.raises(AudioDecodeError, match="longer than"):
        decode_audio(encode(tmp_path, "wav", "pcm_s16le", seconds=3.0), max_seconds=1.0)
