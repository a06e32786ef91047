"""Records what a session shows and says to an H.264 + AAC mp4, encoded off the event loop."""
from __future__ import annotations

import fractions
import logging
import queue
import threading
from pathlib import Path

import av
import numpy as np

from pipeline.messages import FPS, SAMPLE_RATE
from server.media import MediaFrame

log = logging.getLogger(__name__)

AAC_RATE = 48_000
QUEUE_FRAMES = 250  # 10 s of frames may wait for the encoder before we start dropping


class Recorder:
    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width = width - width % 2  # yuv420p needs even sizes
        self.height = height - height % 2
        self._queue: queue.Queue[MediaFrame | None] = queue.Queue(QUEUE_FRAMES)
        self.frames = 0
        self.dropped = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self.path.stem}", daemon=True)
        self._thread.start()

    def add(self, frame: MediaFrame) -> None:
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    def finish(self, timeout: float = 30.0) -> Path:
        """Stop, flush the encoders, close the file (blocking: call from a thread)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self.error:
            raise RuntimeError(f"recording failed: {self.error}")
        return self.path

    def _run(self) -> None:
        try:
            with av.open(str(self.path), mode="w") as container:
                video = container.add_stream("libx264", rate=FPS)
                video.width, video.height = self.width, self.height
                video.pix_fmt = "yuv420p"
                video.options = {"preset": "veryfast", "crf": "23"}
                audio = container.add_stream("aac", rate=AAC_RATE)
                audio.layout = "mono"
                resampler = av.AudioResampler(format="fltp", layout="mono", rate=AAC_RATE)
                audio_pts = 0
                while (item := self._queue.get()) is not None:
                    image = np.ascontiguousarray(item.image[: self.height, : self.width])
                    vf = av.VideoFrame.from_ndarray(image, format="rgb24")
                    vf.pts = self.frames
                    vf.time_base = fractions.Fraction(1, FPS)
                    container.mux(video.encode(vf))
                    af = av.AudioFrame.from_ndarray(item.audio.reshape(1, -1), format="s16", layout="mono")
                    af.sample_rate = SAMPLE_RATE
                    af.pts = audio_pts
                    af.time_base = fractions.Fraction(1, SAMPLE_RATE)
                    audio_pts += item.audio.size
                    for out in resampler.resample(af):
                        container.mux(audio.encode(out))
                    self.frames += 1
                for out in resampler.resample(None):
                    container.mux(audio.encode(out))
                container.mux(video.encode(None))
                container.mux(audio.encode(None))
        except Exception as exc:  # reported by finish()
            log.exception("recording to %s failed", self.path)
            self.error = str(exc)
            while self._queue.get() is not None:  # unblock add() until finish()
                pass
