"""Prepare an avatar from the user's own video or picture.

A video is decoded with PyAV, resampled to the avatar frame rate by picking the nearest
source frame for every output tick (no blending: blended frames ghost), cut to
``max_seconds`` and shrunk so its longer side fits ``max_side``; face landmarks come from
MediaPipe in tracking mode. A single picture gets the same idle motion as the default
avatar (breathing, sway, a blink), so it does not stand frozen.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .avatar import Avatar, check_name, save_avatar
from .default import IdleMotion, synthesize_idle
from .landmarks import NUM_LANDMARKS, FaceMeshDetector

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


def prepare_avatar(
    data_dir: Path,
    name: str,
    source: Path,
    max_seconds: float = 20.0,
    fps: int = 25,
    max_side: int = 1280,
) -> Avatar:
    """Turn ``source`` (a video, or a png/jpg picture) into the avatar ``name`` under
    ``data_dir``, replacing any avatar of that name. Raises ``ValueError`` when the source
    cannot be read or shows no face, ``InvalidAvatarName`` for a bad name."""
    check_name(name)  # before any decoding: a bad name should fail at once
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"no such file: {source}")
    if fps <= 0 or max_seconds <= 0 or max_side < 16:
        raise ValueError(f"need fps > 0, max_seconds > 0 and max_side >= 16, got {fps}, {max_seconds}, {max_side}")
    started = time.perf_counter()
    meta: dict[str, Any] = {"builder": "prepare", "source": source.name}
    if source.suffix.lower() in IMAGE_SUFFIXES:
        frames, landmarks = _prepare_image(source, fps, max_side, meta)
    else:
        frames, landmarks = _prepare_video(source, max_seconds, fps, max_side, meta)
    avatar = save_avatar(data_dir, name, frames, landmarks, fps=fps, meta=meta)
    log.info(
        "prepared avatar %r from %s: %d frames %dx%d (%s) in %.1f s",
        name, source.name, avatar.num_frames, avatar.width, avatar.height, meta["kind"],
        time.perf_counter() - started,
    )
    return avatar


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``max_side``, never up,
    and rounded down to even numbers: H.264 with 4:2:0 chroma needs even sizes."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, int(width * scale) // 2 * 2)
    h = max(2, int(height * scale) // 2 * 2)
    return w, h


def _prepare_image(source: Path, fps: int, max_side: int, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    bgr = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {source}")
    h, w = bgr.shape[:2]
    tw, th = fit_size(w, h, max_side)
    if max(w, h) > max_side:
        bgr = cv2.resize(bgr, (tw, th), interpolation=cv2.INTER_AREA)
    else:
        bgr = bgr[:th, :tw]  # small enough: an odd size only loses its last row/column
    still = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    lm = still_landmarks(still)
    if not np.isfinite(lm).all():
        raise ValueError(f"no face found in {source}: use a picture with one clearly visible, frontal face")
    motion = IdleMotion(fps=fps, num_frames=max(2, round(4.0 * fps)))
    meta.update(kind="image", source_size=[w, h], idle_motion=asdict(motion))
    return synthesize_idle(still, lm, motion)


def _prepare_video(
    source: Path, max_seconds: float, fps: int, max_side: int, meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    import av

    try:
        container = av.open(str(source))
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read {source} as a video or picture: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ValueError(f"{source} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        limit = max(1, math.floor(max_seconds * fps + 1e-6))
        # The buffer below is sized by `limit`: cap it by the clip's own length when the
        # container knows it, so a generous max_seconds does not reserve gigabytes.
        duration = _duration_s(container, stream)
        if duration is not None:
            limit = min(limit, math.ceil(duration * fps) + 2)
        picked = _pick_frames(container.decode(stream), rate, fps, limit)
        frames: np.ndarray | None = None
        n = 0
        try:
            for frame in picked:
                w, h = fit_size(frame.width, frame.height, max_side)
                rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
                rgb = _apply_rotation(rgb, getattr(frame, "rotation", 0) or 0)
                if frames is None:
                    # Preallocated: a 20 s 720p clip is 1.4 GB, and a list then a np.stack
                    # would hold it twice.
                    frames = np.empty((limit, *rgb.shape), np.uint8)
                elif rgb.shape != frames.shape[1:]:
                    raise ValueError(f"{source}: the frame size changes mid-stream ({rgb.shape} after {frames.shape[1:]})")
                frames[n] = rgb
                n += 1
        except av.error.FFmpegError as exc:
            if n == 0:
                raise ValueError(f"cannot decode {source}: {exc}") from exc
            log.warning("%s: decoding stopped after %d frames: %s", source.name, n, exc)
    if frames is None or n == 0:
        raise ValueError(f"{source} holds no video frames")
    frames = frames[:n]
    landmarks = video_landmarks(frames)
    with_face = np.isfinite(landmarks[:, 0, 0])
    if not with_face.any():
        raise ValueError(f"no face found in {source}: use a video where one face is clearly visible")
    if not with_face.all():
        log.warning("%s: no face in %d of %d frames; those frames keep no landmarks", source.name, int((~with_face).sum()), n)
    meta.update(kind="video", source_fps=rate, frames_without_face=int((~with_face).sum()))
    if n == 1:
        # A one-frame "video" (a GIF, a single-frame file) is a still: give it idle motion.
        motion = IdleMotion(fps=fps, num_frames=max(2, round(4.0 * fps)))
        meta.update(kind="image", idle_motion=asdict(motion))
        return synthesize_idle(np.ascontiguousarray(frames[0]), landmarks[0], motion)
    return np.ascontiguousarray(frames), landmarks


def still_landmarks(image: np.ndarray) -> np.ndarray:
    """Landmarks of the face in one picture, (478, 2), NaN if none; looks in crops too
    when the face is too small for the detector in the whole picture."""
    with FaceMeshDetector(video=False) as det:
        lm = det(image)
        if np.isfinite(lm[0, 0]):
            return lm
        return _search_crops(det, image)


def video_landmarks(frames: np.ndarray) -> np.ndarray:
    """Landmarks for every frame, (N, 478, 2), NaN rows where no face was found.

    MediaPipe's face detector is a short-range model that sees the picture at 128x128, so
    in a wide shot (a bust in a 16:9 frame) it misses a face under ~10% of the width. So
    when the whole-frame pass misses any frame, the face is located (from the frames that
    worked, else by searching crops of a few frames) and a second tracking pass runs on a
    square crop around it; each frame keeps the better of the two answers."""
    n = len(frames)
    h, w = frames.shape[1:3]
    with FaceMeshDetector(video=True) as det:
        full = np.stack([det(np.ascontiguousarray(f)) for f in frames])
    found = np.isfinite(full[:, 0, 0])
    if found.all():
        return full
    if found.any():
        pts = full[found].reshape(-1, 2)
    else:
        pts = np.empty((0, 2), np.float32)
        with FaceMeshDetector(video=False) as det:
            for k in np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int)):
                lm = _search_crops(det, np.ascontiguousarray(frames[k]))
                if np.isfinite(lm[0, 0]):
                    pts = lm
                    break
    if len(pts) == 0:
        return full
    box = _face_square(pts, w, h)
    if box is None:  # the crop would be most of the frame: no better than the first pass
        return full
    x0, y0, side = box
    log.info("face is small in the frame: tracking it again in a %dx%d crop at (%d, %d)", side, side, x0, y0)
    with FaceMeshDetector(video=True) as det:
        crop = np.stack([det(np.ascontiguousarray(f[y0 : y0 + side, x0 : x0 + side])) for f in frames])
    crop += np.array([x0, y0], np.float32)
    use_crop = np.isfinite(crop[:, 0, 0])
    # The crop sees the face larger, so where both found it, its landmarks are the finer.
    return np.where(use_crop[:, None, None], crop, full)


def _face_square(pts: np.ndarray, w: int, h: int) -> tuple[int, int, int] | None:
    """A square (x0, y0, side) inside the frame holding the face points with room around
    them (the detector wants the face at about a third of its input), or None when such a
    square would be nearly the whole frame."""
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    face = float(max(hi - lo))
    side = int(min(max(hi - lo) + 2.0 * face, min(w, h)))
    if side * side > 0.6 * w * h:
        return None
    cx, cy = (lo + hi) / 2.0
    x0 = int(np.clip(round(cx - side / 2), 0, w - side))
    y0 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x0, y0, side


def _search_crops(det: FaceMeshDetector, image: np.ndarray) -> np.ndarray:
    """Look for a face in overlapping square crops (the short side, then half of it);
    landmarks in whole-image pixels of the first crop that has one, else NaN."""
    h, w = image.shape[:2]
    for side in (min(h, w), min(h, w) // 2):
        if side < 64:
            break
        for y0 in _starts(h, side):
            for x0 in _starts(w, side):
                if side == min(h, w) and (w == h):
                    continue  # the whole picture, already tried
                lm = det(np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side]))
                if np.isfinite(lm[0, 0]):
                    return lm + np.array([x0, y0], np.float32)
    return np.full((NUM_LANDMARKS, 2), np.nan, np.float32)


def _starts(length: int, side: int) -> list[int]:
    """Window starts covering ``length`` with windows of ``side``, overlapping by half."""
    if side >= length:
        return [0]
    count = math.ceil((length - side) / (side / 2)) + 1
    return sorted({round(i * (length - side) / (count - 1)) for i in range(count)})


def _pick_frames(decoded: Any, rate: float, fps: int, limit: int) -> Any:
    """Yield, for output ticks 0, 1/fps, 2/fps... (up to ``limit``), the decoded frame whose
    timestamp is nearest. Timestamps count from the first frame; a frame with none is
    placed one source period after the previous one."""
    prev = None
    prev_t = 0.0
    t0: float | None = None
    tick = 0
    period = 1.0 / rate if rate > 0 else 1.0 / fps
    for frame in decoded:
        t = frame.time
        if t is None:
            t = (prev_t + period) if prev is not None else 0.0
        else:
            if t0 is None:
                t0 = t
            t = t - t0
        while tick < limit and tick / fps <= t:
            target = tick / fps
            # The nearer of the previous and this frame (the previous wins ties).
            yield prev if prev is not None and target - prev_t <= t - target else frame
            tick += 1
        if tick >= limit:
            return
        prev, prev_t = frame, t
    # The last frame is shown for one source period: fill ticks that fall inside it.
    while prev is not None and tick < limit and tick / fps < prev_t + period / 2 + 1e-9:
        yield prev
        tick += 1


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE units
    return None


def _apply_rotation(rgb: np.ndarray, degrees: int) -> np.ndarray:
    """Undo a phone video's display rotation (PyAV reports it counter-clockwise)."""
    quarter = round(degrees / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=quarter)) if quarter else rgb
