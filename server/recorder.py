"""Records what a session shows and says to an mp4, as one sink of the player's frames.
Encoding runs on a thread of its own, so the event loop only hands frames over."""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from media.mp4 import Mp4Writer
from server.frames import MediaFrame

log = logging.getLogger(__name__)

QUEUE_FRAMES = 250  # 10 s of frames may wait for the encoder before we start dropping
RECORDING_CRF = 23  # live recordings: smaller files than offline renders (crf 18)


class Recorder:
    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        self._queue: queue.Queue[MediaFrame | None] = queue.Queue(QUEUE_FRAMES)
        self.frames = 0
        self.dropped = 0
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self.path.stem}", daemon=True)
        self._thread.start()

    def add(self, frame: MediaFrame) -> None:
        """A frame sink: never blocks the player."""
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
            with Mp4Writer(self.path, self.width, self.height, crf=RECORDING_CRF) as writer:
                while (item := self._queue.get()) is not None:
                    writer.write(item.image, item.audio)
                    self.frames += 1
        except Exception as exc:  # reported by finish()
            log.exception("recording to %s failed", self.path)
            self.error = str(exc)
            while self._queue.get() is not None:  # unblock add() until finish()
                pass
