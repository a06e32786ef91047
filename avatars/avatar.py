"""A prepared avatar: its frames and face landmarks, on disk under ``<data>/avatars/<name>/``.

Layout (memory-mapped when loaded, so the server and the worker share one copy in the
page cache):

* ``avatar.json``   - name, fps, size, frame count, landmark scheme, how it was made
* ``frames.npy``    - (N, H, W, 3) uint8 RGB
* ``landmarks.npy`` - (N, 478, 2) float32 pixel coordinates (MediaPipe face mesh);
  rows of NaN where no face was found in that frame
"""
from __future__ import annotations

import errno
import json
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

AVATAR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FORMAT_VERSION = 1


class AvatarNotFound(LookupError):
    pass


class InvalidAvatarName(ValueError):
    pass


@dataclass
class Avatar:
    name: str
    path: Path
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    landmarks: np.ndarray  # (N, 478, 2) float32, NaN where no face
    fps: int = 25
    meta: dict[str, Any] = field(default_factory=dict)

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

    def idle_index(self, cursor: int) -> int:
        """Frame shown at ``cursor`` while idle: the clip played forward then backward,
        so the loop has no jump."""
        n = self.num_frames
        if n == 1:
            return 0
        period = 2 * n - 2
        k = cursor % period
        return k if k < n else period - k

    @property
    def clips(self) -> list[str]:
        """Names of the avatar's action clips, played by ``audiotype`` 1..n."""
        return list(self.meta.get("clips", []))

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
        np.save(tmp / "frames.npy", np.ascontiguousarray(frames))
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
        (tmp / "avatar.json").write_text(json.dumps(info, indent=2))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_avatar(data_dir, name)


def load_avatar(data_dir: Path, name: str) -> Avatar:
    folder = avatar_dir(data_dir, name)
    info_path = folder / "avatar.json"
    if not info_path.is_file():
        raise AvatarNotFound(f"avatar {name!r} is not prepared under {avatars_root(data_dir)}")
    info = json.loads(info_path.read_text())
    frames = np.load(folder / "frames.npy", mmap_mode="r")
    landmarks = np.load(folder / "landmarks.npy")
    return Avatar(
        name=name,
        path=folder,
        frames=frames,
        landmarks=landmarks,
        fps=int(info.get("fps", 25)),
        meta=info,
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
