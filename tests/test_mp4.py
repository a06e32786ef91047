"""The one mp4 writer that recordings, offline generation and /digital_human/gen share."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

import media.mp4
from media.mp4 import Mp4Writer, pick_video_codec
from media.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME


def write(path: Path, width: int, height: int, frames: int = 25) -> np.ndarray:
    """Frames of a moving gradient, each with its 40 ms of a 440 Hz tone; returns the audio."""
    t = np.arange(frames * SAMPLES_PER_FRAME) / SAMPLE_RATE
    audio = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    with Mp4Writer(path, width, height) as writer:
        for i in range(frames):
            image = np.full((height, width, 3), 40 + 6 * i, np.uint8)
            image[-1, :] = 250  # the last row: kept by padding, lost by cropping
            writer.write(image, audio[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME])
    return audio


def test_odd_frame_sizes_are_padded_so_no_pixel_is_lost(tmp_path: Path) -> None:
    write(tmp_path / "odd.mp4", 33, 21)
    with av.open(str(tmp_path / "odd.mp4")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (22, 34, 3)
    assert frame[20:, :33].mean() > 200  # the odd last row is there, and repeated into the pad


def test_audio_is_aac_at_the_projects_own_rate_and_lasts_as_long_as_the_frames(tmp_path: Path) -> None:
    audio = write(tmp_path / "a.mp4", 64, 48, frames=50)
    with av.open(str(tmp_path / "a.mp4")) as c:
        stream = c.streams.audio[0]
        assert stream.codec_context.name == "aac" and stream.codec_context.sample_rate == SAMPLE_RATE
        decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    with av.open(str(tmp_path / "a.mp4")) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == 50
    assert abs(decoded.size - audio.size) <= 1024  # AAC pads to whole 1024-sample packets
    spectrum = np.abs(np.fft.rfft(decoded[2048:10_000]))
    assert np.fft.rfftfreq(10_000 - 2048, 1 / SAMPLE_RATE)[spectrum.argmax()] == pytest.approx(440, abs=5)


def test_video_is_h264_at_25_fps(tmp_path: Path) -> None:
    write(tmp_path / "v.mp4", 64, 48)
    with av.open(str(tmp_path / "v.mp4")) as c:
        video = c.streams.video[0]
        assert video.codec_context.name == "h264" and float(video.average_rate) == FPS


def test_without_an_h264_encoder_the_file_is_still_written_with_mpeg4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media.mp4, "_has_encoder", lambda name: name == "mpeg4")
    assert pick_video_codec()[0] == "mpeg4"
    write(tmp_path / "m.mp4", 64, 48, frames=10)
    with av.open(str(tmp_path / "m.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
        assert sum(1 for _ in c.decode(video=0)) == 10


def test_no_video_encoder_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(media.mp4, "_has_encoder", lambda name: False)
    with pytest.raises(RuntimeError, match="no video encoder"):
        pick_video_codec()
