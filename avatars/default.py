"""The default avatar, and the idle motion that brings a still picture to life.

The default avatar is scikit-image's public-domain astronaut portrait (Eileen Collins,
NASA), which ships inside the scikit-image wheel, so the product runs with no download.
A still shown as-is looks frozen, so :func:`synthesize_idle` turns it into a short clip:
slow breathing, a tiny head sway and a blink. The server plays avatar frames forward then
backward (:meth:`Avatar.idle_index`), so every motion here has zero velocity at the first
and the last frame, and the ping-pong loop has no visible turn.

The same synthesis serves any single image given to ``prepare_avatar``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .avatar import FORMAT_VERSION, Avatar, AvatarNotFound, avatars_root, check_name, load_avatar, save_avatar
from .landmarks import (
    CHIN,
    FOREHEAD,
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    detect_landmarks,
)

log = logging.getLogger(__name__)

DEFAULT_NAME = "default"  # the avatar every server has, built from the astronaut

BUILDER = "default-astronaut"
# Bump when the frames this module makes change: cached default avatars are rebuilt.
BUILDER_VERSION = 1

# Eyelid margins, corner to corner: (outer corner, upper lid..., inner corner) and the
# lower lid (which already starts and ends at the corners).
_EYES: tuple[tuple[list[int], list[int]], ...] = (
    ([LEFT_EYE_LOWER[0], *LEFT_EYE_UPPER, LEFT_EYE_LOWER[-1]], LEFT_EYE_LOWER),
    ([RIGHT_EYE_LOWER[0], *RIGHT_EYE_UPPER, RIGHT_EYE_LOWER[-1]], RIGHT_EYE_LOWER),
)


@dataclass(frozen=True)
class IdleMotion:
    """How a still is animated. Sizes are fractions of the image height, so a 1280-pixel
    portrait moves as much (relative to itself) as the 512-pixel default."""

    num_frames: int = 100  # 4 s at 25 fps; played forward then backward, 8 s per loop
    fps: int = 25
    breath_hz: float = 0.25  # ~15 breaths a minute; rounded to whole cycles per clip
    breath_stretch: float = 0.0016  # vertical stretch anchored at the bottom edge
    breath_lift: float = 0.0008  # plus a uniform lift (0.4 px at 512)
    sway_deg: float = 0.4  # head roll about the neck, +- this
    blink_every_s: float = 4.0  # one blink per this much clip (at least one)
    blink_close_s: float = 0.10  # lids come down fast...
    blink_open_s: float = 0.14  # ...and go up a little slower


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def blink_closure(motion: IdleMotion) -> np.ndarray:
    """Eyelid closure per frame, 0 open .. 1 shut, shape (N,)."""
    n = motion.num_frames
    closure = np.zeros(n, np.float32)
    if n < 8:  # too short to show a blink that is not a flicker
        return closure
    count = max(1, round(n / motion.fps / motion.blink_every_s))
    t = np.arange(n) / motion.fps
    for i in range(count):
        # Off-centre (0.62) so that, played forward and backward, the blinks are not
        # evenly spaced (2.96 s and 5.04 s apart for the default clip): less mechanical.
        centre = round((i + 0.62) / count * (n - 1)) / motion.fps
        tau = t - centre
        closing = _smoothstep((tau + motion.blink_close_s) / motion.blink_close_s)
        opening = 1.0 - _smoothstep(tau / motion.blink_open_s)
        closure = np.maximum(closure, np.where(tau <= 0, closing, opening).astype(np.float32))
    return closure


def idle_affines(shape: tuple[int, ...], landmarks: np.ndarray, motion: IdleMotion) -> np.ndarray:
    """One 2x3 affine per frame (N, 2, 3), mapping still pixels to frame pixels."""
    h, w = shape[:2]
    n = motion.num_frames
    u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    # Whole cycles of cos(2*pi*m*u) and cos(pi*u) both have zero slope at u=0 and u=1,
    # so the ping-pong playback turns round smoothly at either end.
    cycles = max(1, round((n - 1) / motion.fps * motion.breath_hz))
    breath = (1.0 - np.cos(2.0 * np.pi * cycles * u)) / 2.0  # 0 exhaled .. 1 inhaled
    sway = 0.8 * np.cos(np.pi * u) + 0.2 * np.cos(3.0 * np.pi * u)  # +-1, not a pure sine

    if np.isfinite(landmarks[CHIN]).all() and np.isfinite(landmarks[FOREHEAD]).all():
        face_h = float(landmarks[CHIN, 1] - landmarks[FOREHEAD, 1])
        pivot = landmarks[CHIN] + np.array([0.0, 0.35 * face_h])  # about where the neck turns
    else:
        pivot = np.array([w / 2.0, h / 2.0])

    out = np.empty((n, 2, 3), np.float64)
    for k in range(n):
        rot = np.vstack([cv2.getRotationMatrix2D((float(pivot[0]), float(pivot[1])), motion.sway_deg * sway[k], 1.0), [0, 0, 1]])
        sy = 1.0 + motion.breath_stretch * breath[k]
        lift = motion.breath_lift * h * breath[k]
        # Stretch upward from the bottom edge (the chest rises, the frame's foot stays put).
        breathe = np.array([[1.0, 0.0, 0.0], [0.0, sy, (1.0 - sy) * h - lift], [0.0, 0.0, 1.0]])
        out[k] = (breathe @ rot)[:2]
    return out


def close_eyes(image: np.ndarray, landmarks: np.ndarray, closure: float) -> np.ndarray:
    """The image with both upper eyelids lowered by ``closure`` (0..1) of the eye opening.

    The skin between a point above the lid and the lid margin is stretched down over the
    eye, so the lashes travel down to the lower lid and the lid keeps the picture's own
    skin and lighting; below the moving margin the eye is left as it is (the lid covers
    it). Only small boxes around the eyes change: the mouth is never touched.
    """
    if closure <= 0.0 or not np.isfinite(landmarks[[i for up, lo in _EYES for i in up + lo]]).all():
        return image
    out = image.copy()
    h, w = image.shape[:2]
    ss = 4  # rows sampled per output row: antialiases the moving lid edge
    for upper_idx, lower_idx in _EYES:
        up = landmarks[upper_idx].astype(np.float64)
        lo = landmarks[lower_idx].astype(np.float64)
        up = up[np.argsort(up[:, 0])]
        lo = lo[np.argsort(lo[:, 0])]
        eye_w = float(up[:, 0].max() - up[:, 0].min())
        if eye_w < 2.0:
            continue
        reach = 0.45 * eye_w  # how far above the lid the stretched skin starts
        x0 = max(math.floor(up[:, 0].min()) - 1, 0)
        x1 = min(math.ceil(up[:, 0].max()) + 2, w)
        y0 = max(math.floor(up[:, 1].min() - reach) - 1, 0)
        y1 = min(math.ceil(lo[:, 1].max()) + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = np.arange(x0, x1, dtype=np.float64)
        y_up = np.interp(xs, up[:, 0], up[:, 1])
        y_lo = np.interp(xs, lo[:, 0], lo[:, 1])
        gap = np.clip(y_lo - y_up, 0.0, None)
        # Shut, the lid margin goes a little past the lower-lid landmarks so no sliver of
        # eye shows under it (the overlap is in proportion to the gap: zero at the corners).
        shift = closure * 1.1 * gap
        y_lid = y_up + shift  # where the lid margin is drawn now
        y_top = y_up - reach
        lash = max(1.0, 0.1 * eye_w)  # the dark lash line moves rigidly, not stretched thick
        ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss - 0.5
        yy = ys[:, None]
        skin = y_top + (yy - y_top) * (y_up - lash - y_top) / np.maximum(y_lid - lash - y_top, 1e-6)
        map_y = np.where((yy >= y_lid - lash) & (yy < y_lid), yy - shift, yy)
        map_y = np.where((yy >= y_top) & (yy < y_lid - lash), skin, map_y).astype(np.float32)
        map_x = np.broadcast_to(xs[None, :], map_y.shape).astype(np.float32)
        warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        warped = warped.reshape(y1 - y0, ss, x1 - x0, 3).mean(axis=1)
        out[y0:y1, x0:x1] = np.clip(warped + 0.5, 0, 255).astype(np.uint8)
    return out


def synthesize_idle(
    still: np.ndarray, landmarks: np.ndarray, motion: IdleMotion | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An idle clip from one RGB picture and its landmarks: ``(frames (N, H, W, 3) uint8,
    landmarks (N, 478, 2) float32)``. Landmarks follow the per-frame affine exactly (the
    blink moves no landmark)."""
    motion = motion or IdleMotion()
    h, w = still.shape[:2]
    affines = idle_affines(still.shape, landmarks, motion)
    closure = blink_closure(motion)
    frames = np.empty((motion.num_frames, h, w, 3), np.uint8)
    lms = np.empty((motion.num_frames, *landmarks.shape), np.float32)
    homog = np.concatenate([landmarks.astype(np.float64), np.ones((len(landmarks), 1))], axis=1)
    for k in range(motion.num_frames):
        src = close_eyes(still, landmarks, float(closure[k]))
        # Cubic, not linear: bilinear resampling at sub-pixel offsets blurs, and the blur
        # would pulse with the motion.
        frames[k] = cv2.warpAffine(
            src, affines[k], (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
        )
        lms[k] = homog @ affines[k].T  # NaN rows stay NaN
    return frames, lms


def default_still() -> np.ndarray:
    """The astronaut portrait, 512x512 RGB, from the scikit-image wheel (no download)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[..., :3])


def build_default(motion: IdleMotion | None = None) -> tuple[np.ndarray, np.ndarray]:
    still = default_still()
    lm = detect_landmarks([still], video=False)[0]
    if not np.isfinite(lm).all():  # pragma: no cover - fixed picture, fixed model
        raise RuntimeError("mediapipe found no face in the default astronaut picture")
    return synthesize_idle(still, lm, motion)


def ensure_default_avatar(data_dir: Path, name: str = DEFAULT_NAME) -> Avatar:
    """The default avatar, built into ``data_dir`` on first use and loaded after that.

    Safe for several processes at once: one builds under a lock file, the others wait and
    then load its result; the write itself is atomic (see ``save_avatar``)."""
    check_name(name)
    cached = _load_current(data_dir, name)
    if cached is not None:
        return cached
    root = avatars_root(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        cached = _load_current(data_dir, name)  # built by another process while we waited
        if cached is not None:
            return cached
        started = time.perf_counter()
        motion = IdleMotion()
        frames, lms = build_default(motion)
        avatar = save_avatar(
            data_dir,
            name,
            frames,
            lms,
            fps=motion.fps,
            meta={
                "builder": BUILDER,
                "builder_version": BUILDER_VERSION,
                "source": "skimage.data.astronaut (public domain, NASA)",
                "kind": "image",
                "idle_motion": asdict(motion),
            },
        )
        log.info(
            "built default avatar %r (%d frames %dx%d) in %.1f s",
            name, avatar.num_frames, avatar.width, avatar.height, time.perf_counter() - started,
        )
        return avatar


def _load_current(data_dir: Path, name: str) -> Avatar | None:
    """The cached avatar if it was made by this builder version (or prepared by the user
    under this name), else None."""
    try:
        avatar = load_avatar(data_dir, name)
    except (AvatarNotFound, OSError, ValueError) as exc:
        if not isinstance(exc, AvatarNotFound):
            log.warning("default avatar %r is unreadable (%s); rebuilding", name, exc)
        return None
    builder = avatar.meta.get("builder")
    if builder not in (None, BUILDER):
        # Someone prepared their own avatar under this name (``python -m avatars prepare
        # --name default``): theirs wins over the built-in one.
        return avatar
    if (
        builder != BUILDER
        or avatar.meta.get("builder_version") != BUILDER_VERSION
        or avatar.meta.get("format") != FORMAT_VERSION  # e.g. raw frames of format 1: rebuilt compressed
    ):
        log.info(
            "default avatar %r was made by %s v%s; rebuilding with v%d",
            name, avatar.meta.get("builder"), avatar.meta.get("builder_version"), BUILDER_VERSION,
        )
        return None
    return avatar


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX). Where there is no fcntl the lock is
    skipped: the atomic write alone still keeps racing builders from corrupting the result."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
