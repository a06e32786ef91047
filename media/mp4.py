"""The one mp4 writer: H.264 video at 25 fps and AAC audio, muxed as they are produced.

Recordings of live sessions, ``python -m pipeline.offline`` and ``/digital_human/gen``
all write through it, so they agree on every choice:

* odd frame sizes (which yuv420p cannot hold) are padded by repeating the last row or
  column, never cropped: every pixel of the avatar stays in the file;
* audio is AAC at the project's own 16 kHz, mono: no resampling, so each frame's 640
  samples land exactly under it and the file's audio is the session's audio;
* video is libx264 where PyAV has it (its wheels do), else OpenH264, else MPEG-4 Part 2
  with a warning, so a build without x264 still writes a playable mp4.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np
import numpy.typing as npt

from media.pcm import Pcm, to_float
from media.timing import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

# Encoders in order of preference, with the options each understands.
_VIDEO_CODECS: tuple[tuple[str, dict[str, str]], ...] = (
    ("libx264", {"preset": "{preset}", "crf": "{crf}"}),
    ("libopenh264", {}),
    ("mpeg4", {}),
)
_FALLBACK_BIT_RATE = 4_000_000  # for encoders without a constant-quality mode


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # PyAV raises several types for an unknown or decode-only codec
        return False
    return True


def pick_video_codec() -> tuple[str, dict[str, str]]:
    """The best H.264 encoder this PyAV build has, and its option template."""
    for name, options in _VIDEO_CODECS:
        if _has_encoder(name):
            if name == "mpeg4":
                log.warning("this PyAV build has no H.264 encoder; writing MPEG-4 Part 2 video instead")
            return name, options
    raise RuntimeError("this PyAV build has no video encoder for mp4 (libx264, libopenh264 or mpeg4)")


class Mp4Writer:
    """Writes one mp4: ``write(image, audio)`` per media frame, or frames and audio
    separately (``write_frame`` / ``write_audio``); ``close`` flushes the encoders."""

    def __init__(self, path: Path | str, width: int, height: int, *, crf: int = 18, preset: str = "veryfast") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width + width % 2, height + height % 2
        codec, template = pick_video_codec()
        self._container = av.open(str(self.path), mode="w")
        try:
            video = self._container.add_stream(codec, rate=FPS)
            audio = self._container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            if not isinstance(video, av.VideoStream) or not isinstance(audio, av.AudioStream):
                raise TypeError(f"PyAV made a {type(video).__name__} and a {type(audio).__name__} for video and audio")
            video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
            if template:
                video.options = {k: v.format(crf=crf, preset=preset) for k, v in template.items()}
            else:
                video.bit_rate = _FALLBACK_BIT_RATE
            self._video, self._audio = video, audio
        except BaseException:
            self._container.close()
            raise
        self._time_base = Fraction(1, FPS)
        self.frames = 0
        self.samples = 0
        self._closed = False

    def start(self) -> None:
        """Open the file and write the container's header now (PyAV otherwise does it at the
        first packet), so a full disk or an unwritable path fails here. On failure only the
        container is closed: encoding after a failed start crashes PyAV."""
        try:
            self._container.start_encoding()
        except BaseException:
            self._closed = True
            self._container.close()
            raise

    def write(self, image: npt.NDArray[np.uint8], audio: Pcm) -> None:
        """One media frame: its picture and the audio it carries."""
        self.write_frame(image)
        self.write_audio(audio)

    def write_frame(self, image: npt.NDArray[np.uint8]) -> None:
        h, w = image.shape[:2]
        if (w, h) != (self.width, self.height):
            image = np.pad(image, ((0, self.height - h), (0, self.width - w), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self.frames
        frame.time_base = self._time_base
        self.frames += 1
        self._container.mux(self._video.encode(frame))

    def write_audio(self, pcm: Pcm) -> None:
        if pcm.size == 0:
            return
        frame = av.AudioFrame.from_ndarray(to_float(pcm)[None, :], format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self.samples
        frame.time_base = Fraction(1, SAMPLE_RATE)
        self.samples += pcm.size
        self._container.mux(self._audio.encode(frame))

    def close(self) -> None:
        """Flush both encoders and finish the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._container.mux(self._video.encode(None))
            self._container.mux(self._audio.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
