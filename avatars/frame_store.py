"""An avatar's frames: compressed on disk, decoded once per machine.

On disk the frames are JPEG images one after another in ``frames.jpg`` with their byte
offsets in ``frames.idx.npy`` (random access, and 10-20 times smaller than raw RGB: 30 s
of 1080p is a few hundred MB instead of 4.7 GB).

In memory every process that shows the avatar (the server's idle loop, the worker's
engines, the offline renderer) maps one shared cache file of decoded RGB frames. A
frame is decoded by the first process that needs it and a flag byte says it is there,
so the avatar is held once per machine however many sessions and processes use it, and
a session can start before the whole clip is decoded. The cache lives in ``/dev/shm``
when that has room for it, else under the data directory (the page cache then holds it
once all the same); its name carries the frames file's identity, so a re-prepared
avatar gets a fresh cache and the stale one is removed. The last process to let go of a
cache removes it.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

log = logging.getLogger(__name__)

FRAMES_FILE = "frames.jpg"
INDEX_FILE = "frames.idx.npy"
JPEG_QUALITY = 93  # visually lossless on faces at a tenth of the raw size
SHM_DIR = Path("/dev/shm")
SHM_FOLDER = "lipsync-avatars"  # not "lipsync_*": those are the sessions' frame rings
SHM_HEADROOM = 256 * 2**20  # leave this much of /dev/shm for the rings
PAGE = 4096


class FrameStoreError(ValueError):
    pass


def write_frames(folder: Path, frames: Iterable[np.ndarray], quality: int = JPEG_QUALITY) -> tuple[int, int, int]:
    """Encode RGB frames into ``folder``'s frames file and index; (count, height, width)."""
    offsets = [0]
    shape: tuple[int, ...] | None = None
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    with open(folder / FRAMES_FILE, "wb") as out:
        for frame in frames:
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise FrameStoreError(f"frames must be (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
            if shape is None:
                shape = frame.shape
            elif frame.shape != shape:
                raise FrameStoreError(f"frame {len(offsets) - 1} is {frame.shape[:2]}, the first was {shape[:2]}")
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR), params)
            if not ok:
                raise FrameStoreError(f"frame {len(offsets) - 1} could not be encoded")
            out.write(buf.tobytes())
            offsets.append(offsets[-1] + int(buf.size))
    if shape is None:
        raise FrameStoreError("no frames")
    np.save(folder / INDEX_FILE, np.asarray(offsets, np.int64))
    return len(offsets) - 1, int(shape[0]), int(shape[1])


def stored_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in (FRAMES_FILE, INDEX_FILE) if (folder / n).is_file())


def identity(folder: Path) -> str:
    """Changes whenever the frames file is rewritten (a re-preparation)."""
    st = (folder / FRAMES_FILE).stat()
    return hashlib.sha1(f"{folder.resolve()}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def cache_dir(data_dir: Path, nbytes: int) -> Path:
    """``/dev/shm/lipsync-avatars`` when tmpfs has room for ``nbytes`` more, else a folder
    under the data directory."""
    shm = SHM_DIR / SHM_FOLDER
    try:
        stat = os.statvfs(SHM_DIR)
        if stat.f_bavail * stat.f_frsize >= nbytes + SHM_HEADROOM:
            shm.mkdir(mode=0o700, exist_ok=True)
            return shm
    except OSError:
        pass
    folder = Path(data_dir) / "cache" / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class SharedFrames:
    """Behaves as a read-only ``(N, H, W, 3)`` uint8 array for the ways the project reads
    frames (``frames[i]``, ``frames[i, y0:y1, x0:x1]``, ``np.asarray(frames)``,
    ``.shape``); each frame is decoded on first access into the shared cache."""

    def __init__(self, folder: Path, name: str, height: int, width: int, data_dir: Path) -> None:
        self.folder = folder
        self._offsets = np.load(folder / INDEX_FILE)
        n = int(self._offsets.size - 1)
        self.shape = (n, height, width, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._jpeg = np.memmap(folder / FRAMES_FILE, dtype=np.uint8, mode="r")
        frame_bytes = height * width * 3
        flags_bytes = -(-n // PAGE) * PAGE
        size = flags_bytes + n * frame_bytes
        # <avatar>-<its folder>-<its frames file>: a re-preparation replaces only its own
        # folder's cache, never the same name's in another data directory
        place = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]
        self.cache_path = cache_dir(data_dir, size) / f"{name}-{place}-{identity(folder)}.frames"
        _remove_stale(self.cache_path, f"{name}-{place}-")
        fd = os.open(self.cache_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Every process using the cache holds a shared lock on it for as long as it does;
            # the last one to let go removes it (``_let_go``), so no cache outlives its users.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse: pages exist once a frame is decoded into them
            mm = np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
        except BaseException:
            os.close(fd)
            raise
        self._let_go = weakref.finalize(self, _let_go, fd, self.cache_path)
        self._flags = mm[:n]
        self._data = mm[flags_bytes:].reshape(self.shape)
        self._view = self._data.view()
        self._view.flags.writeable = False
        self._prefetch: threading.Thread | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def _ensure(self, i: int) -> None:
        if self._flags[i]:
            return
        raw = self._jpeg[self._offsets[i] : self._offsets[i + 1]]
        bgr = cv2.imdecode(np.asarray(raw), cv2.IMREAD_COLOR)
        if bgr is None or bgr.shape != self.shape[1:]:
            raise FrameStoreError(f"{self.folder / FRAMES_FILE}: frame {i} is damaged; prepare the avatar again")
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=self._data[i])
        self._flags[i] = 1  # after the pixels: another process that sees the flag sees them

    def decoded(self) -> int:
        return int(np.count_nonzero(self._flags))

    def __getitem__(self, key: Any) -> np.ndarray:
        first = key[0] if isinstance(key, tuple) else key
        if isinstance(first, (int, np.integer)):
            self._ensure(int(first) % self.shape[0])
        else:
            wanted = range(*first.indices(self.shape[0])) if isinstance(first, slice) else np.asarray(first).ravel()
            for i in wanted:
                self._ensure(int(i) % self.shape[0])
        return self._view[key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        self.decode_all()
        return self._view if dtype is None else self._view.astype(dtype)

    def decode_all(self) -> None:
        for i in range(self.shape[0]):
            self._ensure(i)

    def prefetch(self) -> None:
        """Decode every frame on a background thread (OpenCV's decoder releases the GIL),
        so the idle loop and the engines find them ready."""
        if self._prefetch is None and self.decoded() < self.shape[0]:
            self._prefetch = threading.Thread(target=self.decode_all, name=f"decode-{self.folder.name}", daemon=True)
            self._prefetch.start()

    def drop_cache(self) -> None:
        """Let go of the cache now rather than when this object is collected: it is removed
        if no other process uses it (those that map it keep their pages until they unmap)."""
        self._let_go()


def _let_go(fd: int, path: Path) -> None:
    """Drop this process's hold on a cache, removing the file when nobody else holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # granted only when no other process holds it
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass  # another process uses it: the last one removes it
    finally:
        os.close(fd)


def _remove_stale(path: Path, prefix: str) -> None:
    """Caches of earlier preparations of this avatar in this folder (another frames identity)."""
    for old in path.parent.glob(f"{glob.escape(prefix)}*.frames"):
        if old != path and "-" not in old.name[len(prefix) :]:
            old.unlink(missing_ok=True)

