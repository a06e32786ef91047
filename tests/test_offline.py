"""Offline generation: an audio file in, an H.264 + AAC mp4 with a frame per 40 ms out."""
from __future__ import annotations

import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from media.decode import AudioDecodeError
from pipeline.messages import VideoResult
from pipeline.offline import generate_video, main
from tests.support.musetalk_fixtures import make_avatar, speech_like


def _write_wav(path: Path, pcm: np.ndarray, rate: int = 16_000, channels: int = 1) -> Path:
    data = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
    if channels == 2:
        data = np.repeat(data[:, None], 2, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return path


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        info = {
            "video_codec": video.codec_context.name,
            "audio_codec": audio.codec_context.name,
            "fps": float(video.average_rate),
            "size": (video.codec_context.width, video.codec_context.height),
        }
        frames = list(c.decode(video=0))
        info["frames"] = len(frames)
        info["video_end"] = float(frames[-1].time) + 1 / 25
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0))
        info["audio_seconds"] = samples / c.streams.audio[0].codec_context.sample_rate
    return info


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("offline")
    make_avatar(data, "astro", frames=5, no_face=(1,))
    return data


def test_musetalk_mp4_has_a_frame_for_every_40ms_of_audio_and_matching_duration(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    from pipeline.engines.musetalk import MuseTalkEngine
    from tests.support.musetalk_fixtures import write_tiny_checkpoints

    write_tiny_checkpoints(data, versions=("v15",))
    samples = 16_000 + 100  # 25.16 frames of audio: the last partial frame must not be dropped
    audio = _write_wav(tmp_path / "in.wav", speech_like(samples / 16_000, seed=3)[:samples])
    engine = MuseTalkEngine(data, device="cpu", max_batch=4)
    result = generate_video(data, "astro", audio, tmp_path / "out.mp4", engine=engine)
    assert result == VideoResult(str(tmp_path / "out.mp4"), 26, pytest.approx(1.04))
    info = _probe(tmp_path / "out.mp4")
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
    assert info["fps"] == 25 and info["size"] == (512, 512)
    assert info["frames"] == 26 and info["video_end"] == pytest.approx(1.04, abs=1e-3)
    assert info["audio_seconds"] == pytest.approx(1.04, abs=0.07)  # AAC pads to whole 1024-sample packets
    assert not list(tmp_path.glob("*.part.mp4"))


def test_cpu_engine_with_stereo_44k_input_covers_all_audio(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("pipeline.engines.cpu_mouth")
    audio = _write_wav(tmp_path / "in.wav", speech_like(0.53, seed=4, rate=44_100), rate=44_100, channels=2)
    result = generate_video(data, "astro", audio, tmp_path / "out.mp4", engine_name="cpu")
    decoded_samples = round(0.53 * 44_100) * 16_000 / 44_100
    assert abs(result.frames - math.ceil(decoded_samples / 640)) <= 1
    assert _probe(tmp_path / "out.mp4")["frames"] == result.frames


def test_cli_writes_the_mp4_and_reports_failures_in_one_line(data: Path, tmp_path: Path, caplog) -> None:
    pytest.importorskip("pipeline.engines.cpu_mouth")
    audio = _write_wav(tmp_path / "in.wav", speech_like(0.2, seed=5))
    out = tmp_path / "cli.mp4"
    assert main(["--data-dir", str(data), "--avatar", "astro", "--audio", str(audio), "--out", str(out), "--engine", "cpu"]) == 0
    assert _probe(out)["frames"] == 5
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    assert main(["--data-dir", str(data), "--avatar", "astro", "--audio", str(tmp_path / "bad.wav"),
                 "--out", str(tmp_path / "x.mp4"), "--engine", "cpu"]) == 1
    assert "AudioDecodeError" in caplog.text


def test_unreadable_audio_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "bad.wav").write_bytes(b"RIFF....garbage")
    with pytest.raises(AudioDecodeError):
        generate_video(tmp_path, "astro", tmp_path / "bad.wav", tmp_path / "out.mp4", engine_name="cpu")
