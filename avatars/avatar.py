"""A prepared avatar: its frames and face landmarks, on disk under ``<data>/avatars/<name>/``.

Layout:

* ``avatar.json``   - format version, name, fps, size, frame count, landmark scheme, how
  it was made and with which parameters
* ``frames.jpg`` and ``frames.idx.npy`` - the frames as JPEG with their offsets, decoded
  once per machine into a shared cache when used (``avatars.frame_store``); avatars of
  format 1 have ``frames.npy`` instead, (N, H, W, 3) uint8 RGB, memory-mapped
* ``landmarks.npy`` - (N, 478, 2) float32 pixel coordinates (MediaPipe face mesh);
  rows of NaN where no face was found in that frame
* ``clips/<name>/`` - action clips, listed in ``avatar.json`` (``avatars.clips``)
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .clips import Clip, load_clips
from .frame_store import FRAMES_FILE, INDEX_FILE, SharedFrames, identity, write_frames

log = logging.getLogger(__name__)

AVATAR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FORMAT_VERSION = 2  # 1: raw frames.npy (still read)
LEGACY_FRAMES = "frames.npy"


Frames = SharedFrames | np.ndarray  # (N, H, W, 3) uint8 RGB, read-only


class AvatarNotFound(LookupError):
    pass


class InvalidAvatarName(ValueError):
    pass


@dataclass
class Avatar:
    name: str
    path: Path
    frames: Frames
    landmarks: np.ndarray  # (N, 478, 2) float32, NaN where no face
    fps: int = 25
    meta: dict[str, Any] = field(default_factory=dict)
    clips: list[Clip] = field(default_factory=list)  # action clips by number (``avatars.clips``)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def frames_identity(self) -> str:
        """Changes whenever the avatar's frames are rewritten (for caches derived from them)."""
        if (self.path / FRAMES_FILE).is_file():
            return identity(self.path)
        legacy = self.path / LEGACY_FRAMES
        if legacy.is_file():
            st = legacy.stat()
            return f"{LEGACY_FRAMES}:{st.st_size}:{st.st_mtime_ns}"
        return f"{self.frames.shape}"

    def release(self) -> None:
        """Drop the machine's decoded-frame cache (a process mapping it keeps its pages)."""
        if isinstance(self.frames, SharedFrames):
            self.frames.drop_cache()
        for clip in self.clips:
            clip.drop_cache()

    def idle_index(self, cursor: int) -> int:
        """Frame shown at ``cursor`` while idle: the clip played forward then backward,
        so the loop has no jump."""
        n = self.num_frames
        if n == 1:
            return 0
        period = 2 * n - 2
        k = cursor % period
        return k if k < n else period - k

    def has_face(self, index: int) -> bool:
        return bool(np.isfinite(self.landmarks[index, 0, 0]))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not AVATAR_NAME_RE.fullmatch(name):
        raise InvalidAvatarName(
            f"invalid avatar name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def avatars_root(data_dir: Path) -> Path:
    return Path(data_dir) / "avatars"


def avatar_dir(data_dir: Path, name: str) -> Path:
    return avatars_root(data_dir) / check_name(name)


def save_avatar(
    data_dir: Path,
    name: str,
    frames: np.ndarray,
    landmarks: np.ndarray,
    fps: int = 25,
    meta: dict[str, Any] | None = None,
) -> Avatar:
    """Write an avatar atomically (a temporary folder renamed into place)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if landmarks.shape[0] != frames.shape[0] or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be (N, K, 2) with N={frames.shape[0]}, got {landmarks.shape}")
    final = avatar_dir(data_dir, name)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A unique, dot-prefixed temporary folder: two writers racing on one name never share
    # it, and list_avatars never shows it (the name rule refuses a leading dot).
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a published avatar is an ordinary folder
        write_frames(tmp, frames)
        np.save(tmp / "landmarks.npy", landmarks.astype(np.float32))
        info = {
            "format": FORMAT_VERSION,
            "name": name,
            "fps": fps,
            "num_frames": int(frames.shape[0]),
            "height": int(frames.shape[1]),
            "width": int(frames.shape[2]),
            "landmarks": "mediapipe-478",
            **(meta or {}),
        }
        info.update(_keep_clips(final, tmp, info))
        (tmp / "avatar.json").write_text(json.dumps(info, indent=2))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_avatar(data_dir, name)


def _keep_clips(final: Path, tmp: Path, info: dict[str, Any]) -> dict[str, Any]:
    """A re-prepared avatar keeps its action clips when they still fit it (same frame size
    and rate); they are copied into the new version before it is published."""
    try:
        old = json.loads((final / "avatar.json").read_text())
    except (OSError, ValueError):
        return {}
    clips = old.get("clips") or []
    if not clips or not (final / "clips").is_dir():
        return {}
    if [old.get(k) for k in ("width", "height", "fps")] != [info[k] for k in ("width", "height", "fps")]:
        log.warning("avatar %r: its %d action clip(s) do not fit the new size or rate and are dropped; add them again",
                    info["name"], len(clips))
        return {}
    shutil.copytree(final / "clips", tmp / "clips")
    return {"clips": clips}


def update_avatar(data_dir: Path, name: str, landmarks: np.ndarray | None = None, meta: dict[str, Any] | None = None) -> Avatar:
    """Re-prepare part of an avatar in place: new landmarks and/or metadata, its frames
    kept as they are (each file replaced atomically). Engine material derived from the
    landmarks notices the change by its key and is made again; the rest is kept."""
    current = load_avatar(data_dir, name)
    if landmarks is not None:
        if landmarks.shape[0] != current.num_frames or landmarks.shape[-1] != 2:
            raise ValueError(f"landmarks must be (N, K, 2) with N={current.num_frames}, got {landmarks.shape}")
        _replace_file(current.path / "landmarks.npy", lambda f: np.save(f, landmarks.astype(np.float32)))
    if meta:
        info = {**current.meta, **meta}
        _replace_file(current.path / "avatar.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    return load_avatar(data_dir, name)


def _replace_file(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_avatar(data_dir: Path, name: str) -> Avatar:
    folder = avatar_dir(data_dir, name)
    info_path = folder / "avatar.json"
    if not info_path.is_file():
        raise AvatarNotFound(f"avatar {name!r} is not prepared under {avatars_root(data_dir)}")
    info = json.loads(info_path.read_text())
    frames: Frames
    if (folder / FRAMES_FILE).is_file() and (folder / INDEX_FILE).is_file():
        frames = SharedFrames(folder, name, int(info["height"]), int(info["width"]), data_dir)
    else:
        frames = np.load(folder / LEGACY_FRAMES, mmap_mode="r")
    landmarks = np.load(folder / "landmarks.npy")
    return Avatar(
        name=name,
        path=folder,
        frames=frames,
        landmarks=landmarks,
        fps=int(info.get("fps", 25)),
        meta=info,
        clips=load_clips(folder, info, data_dir),
    )


def list_avatars(data_dir: Path) -> list[str]:
    root = avatars_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if AVATAR_NAME_RE.fullmatch(p.name) and (p / "avatar.json").is_file()
    )


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` into place, replacing any previous version. The old folder is moved
    aside first (a rename onto a non-empty folder fails) and removed afterwards; readers
    that memory-mapped it keep their pages (the files stay alive until unmapped)."""
    for _ in range(10):
        old: Path | None = None
        if final.exists():
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            try:
                final.rename(old)
            except FileNotFoundError:  # another writer moved it first
                old = None
        try:
            tmp.rename(final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another writer published between our two renames: go again
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not publish {final}: other writers keep replacing it")
