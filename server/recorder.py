"""Records what a session shows and says to an mp4, as one sink of the player's frames.

The file is opened, and its header written, before the constructor returns, so a
recording that cannot start (no space left, an unwritable or impossible path) fails the
request that asked for it, with a message that says why. Encoding then runs on a thread
of its own, so the event loop only hands frames over; a failure there (the disk filling
up part way) is logged at once and raised by ``finish``, and the unplayable partial file
(an mp4 gets its index only when it is closed) is removed, which also gives the space back.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import queue
import shutil
import threading
from pathlib import Path

from media.mp4 import Mp4Writer
from server.errors import ErrorCode, LipSyncError
from server.frames import MediaFrame

log = logging.getLogger(__name__)

QUEUE_FRAMES = 250  # 10 s of frames may wait for the encoder before we start dropping
RECORDING_CRF = 23  # live recordings: smaller files than offline renders (crf 18)
# A recording is refused with less free space than this where it would be written: at
# crf 23 a 512x512 session takes about 0.1-0.5 MB a second, so this is minutes, not hours.
MIN_FREE_BYTES = 64 * 1024 * 1024
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class RecordingError(LipSyncError):
    """A recording could not start, or failed part way; ``msg`` says why.

    ``no_space`` is True when storage ran out (no space left on the device, the disk
    quota, the file size limit): HTTP 507 Insufficient Storage; anything else (an
    unwritable path, an encoder failure) is a 500 with the reason.
    """

    default_code = ErrorCode.INTERNAL

    def __init__(self, msg: str, no_space: bool = False, code: ErrorCode | None = None) -> None:
        super().__init__(msg, code or (ErrorCode.INSUFFICIENT_STORAGE if no_space else None))
        self.no_space = no_space


def describe(exc: BaseException, path: Path) -> tuple[str, bool]:
    """What went wrong writing ``path``, for a person; and whether storage ran out."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.ENOSPC:
        return f"no space left on the device that holds {path.parent}", True
    if code == errno.EDQUOT:
        return f"the disk quota for {path.parent} is used up", True
    if code == errno.EFBIG:
        return f"{path.name} reached the largest file size allowed here", True
    if code in (errno.EEXIST, errno.ENOTDIR):  # a file where a directory of the path should be
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        return f"{path} cannot be written: {blocking} is not a directory", False
    if isinstance(exc, OSError) and exc.strerror:
        return f"{path} cannot be written: {exc.strerror}", False
    return f"{type(exc).__name__}: {exc}", False


class Recorder:
    """Raises ``RecordingError`` if the file cannot be started (blocking: the header's
    write and the encoder's set-up, a few milliseconds)."""

    def __init__(self, path: Path, width: int, height: int) -> None:
        self.path = Path(path)
        self.width, self.height = width, height
        self._queue: queue.Queue[MediaFrame | None] = queue.Queue(QUEUE_FRAMES)
        self.frames = 0
        self.dropped = 0
        self.error: str | None = None  # why it failed part way
        self.no_space = False  # ... and whether that was storage running out
        self._writer = self._open()
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self.path.stem}", daemon=True)
        self._thread.start()

    def _open(self) -> Mp4Writer:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.path.parent).free
        except OSError as exc:
            message, no_space = describe(exc, self.path)
            raise RecordingError(f"could not start the recording: {message}", no_space) from exc
        if free < MIN_FREE_BYTES:
            raise RecordingError(
                f"could not start the recording: no space left on the device that holds {self.path.parent} "
                f"({free / 2**20:.1f} MiB free; a recording needs at least {MIN_FREE_BYTES // 2**20} MiB)",
                no_space=True,
            )
        try:
            writer = Mp4Writer(self.path, self.width, self.height, crf=RECORDING_CRF)
        except Exception as exc:
            message, no_space = describe(exc, self.path)
            raise RecordingError(f"could not start the recording: {message}", no_space) from exc
        try:
            writer.start()  # the header now, so a failure is this request's
        except Exception as exc:
            self._remove_partial()
            message, no_space = describe(exc, self.path)
            raise RecordingError(f"could not start the recording: {message}", no_space) from exc
        return writer

    def add(self, frame: MediaFrame) -> None:
        """A frame sink: never blocks the player."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    def finish(self, timeout: float = 30.0) -> Path:
        """Stop, flush the encoders, close the file (blocking: call from a thread). Raises
        ``RecordingError`` if the recording failed at any point."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RecordingError(f"the recording to {self.path.name} did not finish within {timeout:.0f} s")
        if self.error:
            raise RecordingError(f"the recording failed: {self.error}", self.no_space)
        return self.path

    def _run(self) -> None:
        writer = self._writer
        try:
            while (item := self._queue.get()) is not None:
                writer.write(item.image, item.audio)
                self.frames += 1
            writer.close()
            return
        except Exception as exc:  # raised by finish()
            message, no_space = describe(exc, self.path)
            error = f"{message} after {self.frames} frames; the partial file was removed"
            log.error("recording to %s failed: %s", self.path, error, exc_info=True)
            self.error, self.no_space = error, no_space
        with contextlib.suppress(Exception):  # the same failure again, as the encoders flush
            writer.close()
        self._remove_partial()
        while self._queue.get() is not None:  # let finish()'s put through
            pass

    def _remove_partial(self) -> None:
        try:
            if self.path.is_file():  # not a device or whatever else the path names
                self.path.unlink()
        except OSError:
            log.warning("could not remove the partial recording %s", self.path, exc_info=True)
