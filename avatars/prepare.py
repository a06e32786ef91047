"""Prepare an avatar from the user's own video, picture or folder of pictures.

A video is decoded with PyAV, resampled to the avatar frame rate by picking the nearest
source frame for every output tick (no blending: blended frames ghost), cut to
``max_seconds`` and shrunk so its longer side fits ``max_side``; a folder's pictures,
sorted by name, are its frames at that rate. Face landmarks come from MediaPipe's face
mesh in tracking mode, and every frame's face is checked (:mod:`avatars.face_check`): a
source without a real, large enough, frontal human face in most frames is refused
with what was wrong; frames without a face keep their place with landmarks carried
from their neighbours, and avatar.json lists them. A single picture gets the same idle
motion as the default avatar (breathing, sway, a blink), so it does not stand frozen.

avatar.json records how the avatar was made (``prepare``: the source's name and sha1,
the frame parameters, the detector settings). Preparing the same name again reuses
what still holds: the same source and frame parameters keep the frames and only the
landmarks are made again when the detector settings changed, or nothing happens
when nothing changed. A different source is refused unless ``replace`` is given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .avatar import Avatar, AvatarNotFound, avatars_root, check_name, load_avatar, save_avatar, update_avatar
from .default import IdleMotion, synthesize_idle
from .face_check import (
    DetectorSettings,
    FaceReport,
    Frames,
    NoUsableFace,
    bbox_shift_range,
    carry_landmarks,
    check_faces,
    index_ranges,
    median_box,
)
from .frame_store import FRAMES_FILE, INDEX_FILE
from .landmarks import NUM_LANDMARKS, FaceMeshDetector
from .progress import ProgressCallback, StageProgress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# Bump when the frames or landmarks made here change: avatars prepared by an earlier
# version are prepared again in full (their source permitting) on the next run.
PREPARE_VERSION = 1
BUILDER = "prepare"
# Decoded frames above this size wait for encoding in a scratch file, not in RAM
# (60 s of 720p is 4 GB).
SCRATCH_BYTES = 1 << 30

PREPARED = "prepared"
LANDMARKS_ONLY = "landmarks"
UP_TO_DATE = "up-to-date"


class SourceChanged(ValueError):
    """The avatar exists, made from another source; replacing it needs ``replace``."""


@dataclass(frozen=True)
class FrameParams:
    fps: int = 25
    max_seconds: float = 60.0
    max_side: int = 1280


@dataclass(frozen=True)
class SourceInfo:
    path: Path
    kind: str  # "video", "image" or "images" (a folder)
    sha1: str
    size: int  # bytes
    files: tuple[Path, ...] = ()  # a folder's pictures, in order

    @property
    def name(self) -> str:
        return self.path.name + ("/" if self.kind == "images" else "")

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "sha1": self.sha1, "bytes": self.size}
        if self.files:
            out["files"] = len(self.files)
        return out


@dataclass
class PrepareResult:
    avatar: Avatar
    action: str  # PREPARED, LANDMARKS_ONLY or UP_TO_DATE
    seconds: float
    warnings: list[str] = field(default_factory=list)


def prepare_avatar(
    data_dir: Path,
    name: str,
    source: Path,
    max_seconds: float = 60.0,
    fps: int = 25,
    max_side: int = 1280,
    *,
    detector: DetectorSettings | None = None,
    replace: bool = False,
    progress: ProgressCallback | None = None,
) -> Avatar:
    """Turn ``source`` (a video, a picture or a folder of pictures) into the avatar
    ``name`` under ``data_dir``; see :func:`prepare`."""
    return prepare(
        data_dir, name, source, max_seconds, fps, max_side, detector=detector, replace=replace, progress=progress
    ).avatar


def prepare(
    data_dir: Path,
    name: str,
    source: Path,
    max_seconds: float = 60.0,
    fps: int = 25,
    max_side: int = 1280,
    *,
    detector: DetectorSettings | None = None,
    replace: bool = False,
    progress: ProgressCallback | None = None,
) -> PrepareResult:
    """Prepare (or bring up to date) the avatar ``name`` from ``source``.

    Raises ``NoUsableFace`` (a ``ValueError``) when the source shows no usable human
    face, ``SourceChanged`` when ``name`` exists from another source and ``replace`` is
    false, ``ValueError`` when the source cannot be read, ``InvalidAvatarName`` for a
    bad name. ``replace`` also forces a full preparation."""
    check_name(name)  # before any decoding: a bad name should fail at once
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no such file: {source}")
    if fps <= 0 or max_seconds <= 0 or max_side < 16:
        raise ValueError(f"need fps > 0, max_seconds > 0 and max_side >= 16, got {fps}, {max_seconds}, {max_side}")
    started = time.perf_counter()
    params = FrameParams(int(fps), float(max_seconds), int(max_side))
    settings = detector or DetectorSettings()
    info = identify_source(source)
    existing = _existing(data_dir, name)
    if existing is not None and not replace:
        plan = _plan(existing, info, params, settings)
        if plan == UP_TO_DATE:
            log.info("avatar %r is up to date with %s", name, info.name)
            return PrepareResult(existing, UP_TO_DATE, time.perf_counter() - started)
        if plan == LANDMARKS_ONLY:
            avatar, warnings = _redo_landmarks(data_dir, existing, info, params, settings, progress)
            seconds = time.perf_counter() - started
            log.info("avatar %r: landmarks made again from its %d stored frames in %.1f s", name, avatar.num_frames, seconds)
            return PrepareResult(avatar, LANDMARKS_ONLY, seconds, warnings)
    avatar, warnings = _prepare_full(data_dir, name, info, params, settings, progress)
    seconds = time.perf_counter() - started
    log.info(
        "prepared avatar %r from %s: %d frames %dx%d (%s) in %.1f s",
        name, info.name, avatar.num_frames, avatar.width, avatar.height, avatar.meta["kind"], seconds,
    )
    return PrepareResult(avatar, PREPARED, seconds, warnings)


# ---- what to do with an existing avatar ---------------------------------------------


def _existing(data_dir: Path, name: str) -> Avatar | None:
    try:
        return load_avatar(data_dir, name)
    except AvatarNotFound:
        return None
    except (OSError, ValueError) as exc:  # half-broken: nothing in it is worth keeping
        log.warning("avatar %r is unreadable (%s): preparing it again", name, exc)
        return None


def _plan(existing: Avatar, info: SourceInfo, params: FrameParams, settings: DetectorSettings) -> str:
    record = existing.meta.get("prepare")
    made_from = record.get("source", {}) if isinstance(record, dict) else {}
    if made_from.get("sha1") != info.sha1:
        was = made_from.get("name") or existing.meta.get("source") or "an unknown source"
        how = "another source" if made_from.get("sha1") else "a source this version cannot compare"
        raise SourceChanged(
            f"avatar {existing.name!r} exists, made from {was} ({how}); {info.name} would replace it: "
            f"replace it on purpose (--replace), or choose another name"
        )
    assert isinstance(record, dict)
    if record.get("version") != PREPARE_VERSION or not _same_frames(record, existing, params):
        return PREPARED
    if record.get("detector") == _json_form(settings.record()):
        return UP_TO_DATE
    # A picture's frames are its idle motion around one detection: cheaper made again.
    return PREPARED if existing.meta.get("kind") == "image" else LANDMARKS_ONLY


def _same_frames(record: dict[str, Any], existing: Avatar, params: FrameParams) -> bool:
    old = record.get("frames", {})
    if old.get("fps") != params.fps or old.get("max_side") != params.max_side:
        return False
    if old.get("max_seconds") == params.max_seconds or existing.meta.get("kind") == "image":
        return True
    # Not cut before, and the new limit does not cut it either: the same frames.
    return not record.get("cut", True) and math.floor(params.max_seconds * params.fps + 1e-6) >= existing.num_frames


def _json_form(value: dict[str, Any]) -> dict[str, Any]:
    """As avatar.json gives it back (tuples become lists)."""
    out: dict[str, Any] = json.loads(json.dumps(value))
    return out


def _record(info: SourceInfo, params: FrameParams, settings: DetectorSettings, cut: bool) -> dict[str, Any]:
    return {
        "version": PREPARE_VERSION,
        "source": info.record(),
        "frames": asdict(params),
        "cut": cut,
        "detector": settings.record(),
    }


# ---- sources --------------------------------------------------------------------------


def identify_source(source: Path) -> SourceInfo:
    """What ``source`` is, and the sha1 of its bytes (a folder: of its pictures' names
    and bytes, in order)."""
    if source.is_dir():
        files = tuple(sorted((p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_natural))
        if not files:
            raise ValueError(f"{source} holds no pictures ({', '.join(sorted(IMAGE_SUFFIXES))})")
        digest = hashlib.sha1()
        size = 0
        for f in files:
            digest.update(f.name.encode() + b"\0" + _sha1(f).encode())
            size += f.stat().st_size
        return SourceInfo(source, "images", digest.hexdigest(), size, files)
    kind = "image" if source.suffix.lower() in IMAGE_SUFFIXES else "video"
    return SourceInfo(source, kind, _sha1(source), source.stat().st_size)


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _natural(path: Path) -> list[Any]:
    """frame2 before frame10, as a person numbering pictures means it."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``max_side``, never up,
    and rounded down to even numbers: H.264 with 4:2:0 chroma needs even sizes."""
    scale = min(1.0, max_side / max(width, height))
    w = max(2, int(width * scale) // 2 * 2)
    h = max(2, int(height * scale) // 2 * 2)
    return w, h


class _Scratch:
    """Room for decoded frames: RAM for a short clip, a temporary file beside the
    avatars for a long one. The file is unlinked as soon as it is mapped, so nothing is
    left behind even when the preparation is killed."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self._dir = avatars_root(data_dir)
        self._name = name
        self._files: list[Path] = []

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        if math.prod(shape) <= SCRATCH_BYTES:
            return np.empty(shape, np.uint8)
        self._dir.mkdir(parents=True, exist_ok=True)
        # dot-prefixed: never listed as an avatar
        path = self._dir / f".{self._name}.{uuid.uuid4().hex[:8]}.frames.tmp"
        frames = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        try:
            path.unlink()  # the mapping keeps the pages
        except OSError:  # pragma: no cover - a system that cannot unlink an open file
            self._files.append(path)
        return frames

    def close(self) -> None:
        for path in self._files:
            path.unlink(missing_ok=True)


def _read_picture(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read picture {path}")
    return bgr


def _fit_picture(bgr: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB at (width, height): an odd pixel too many is cropped, anything else resized."""
    h, w = bgr.shape[:2]
    if 0 <= w - width <= 1 and 0 <= h - height <= 1:
        bgr = bgr[:height, :width]
    else:
        shrink = w > width or h > height
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def _read_pictures(
    info: SourceInfo, params: FrameParams, scratch: _Scratch, progress: ProgressCallback | None, meta: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    paths = info.files or (info.path,)
    limit = max(1, math.floor(params.max_seconds * params.fps + 1e-6))
    cut = len(paths) > limit
    paths = paths[:limit]
    stage = StageProgress(progress, "decode", len(paths))
    first = _read_picture(paths[0])
    h0, w0 = first.shape[:2]
    tw, th = fit_size(w0, h0, params.max_side)
    frames = scratch.array((len(paths), th, tw, 3))
    for k, path in enumerate(paths):
        bgr = first if k == 0 else _read_picture(path)
        h, w = bgr.shape[:2]
        if abs(w / h - w0 / h0) > 0.02 * (w0 / h0):
            raise ValueError(f"{path.name} is {w}x{h} but {paths[0].name} is {w0}x{h0}: a folder's pictures must share one shape")
        frames[k] = _fit_picture(bgr, tw, th)
        stage.step()
    stage.finish()
    meta["source_size"] = [w0, h0]
    return frames, cut


def _decode_video(
    info: SourceInfo, params: FrameParams, scratch: _Scratch, progress: ProgressCallback | None, meta: dict[str, Any]
) -> tuple[np.ndarray, bool]:
    import av

    source = info.path
    try:
        container = av.open(str(source))
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read {source.name} as a video or picture: {exc}") from exc
    fps = params.fps
    with container:
        if not container.streams.video:
            raise ValueError(f"{source.name} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or fps)
        max_ticks = max(1, math.floor(params.max_seconds * fps + 1e-6))
        limit = max_ticks
        # The buffer below is sized by `limit`: cap it by the clip's own length when the
        # container knows it, so a generous max_seconds does not reserve gigabytes.
        duration = _duration_s(container, stream)
        if duration is not None:
            limit = min(limit, math.ceil(duration * fps) + 2)
        stage = StageProgress(progress, "decode", limit if duration is not None else max_ticks)
        picked = _pick_frames(container.decode(stream), rate, fps, limit)
        frames: np.ndarray | None = None
        n = 0
        source_size = (0, 0)
        try:
            for frame in picked:
                w, h = fit_size(frame.width, frame.height, params.max_side)
                rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="AREA")
                rotation = getattr(frame, "rotation", 0) or 0
                rgb = _apply_rotation(rgb, rotation)
                if frames is None:
                    # Preallocated: a list then a np.stack would hold the clip twice.
                    frames = scratch.array((limit, *rgb.shape))
                    source_size = (frame.height, frame.width) if round(rotation / 90) % 2 else (frame.width, frame.height)
                elif rgb.shape != frames.shape[1:]:
                    raise ValueError(f"{source.name}: the frame size changes mid-stream ({rgb.shape} after {frames.shape[1:]})")
                frames[n] = rgb
                n += 1
                stage.step()
        except av.error.FFmpegError as exc:
            if n == 0:
                raise ValueError(f"cannot decode {source.name}: {exc}") from exc
            log.warning("%s: decoding stopped after %d frames: %s", source.name, n, exc)
    if frames is None or n == 0:
        raise ValueError(f"{source.name} holds no video frames")
    stage.finish(n)
    cut = n >= max_ticks and (duration is None or duration > params.max_seconds + 0.5 / fps)
    if cut:
        log.info("%s: using its first %.1f s (max_seconds)", source.name, n / fps)
    meta.update(source_fps=rate, source_size=list(source_size))
    return frames[:n], cut


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


class _StoredFrames:
    """A prepared avatar's frames read straight from its JPEG file, one at a time (its
    shared decoded cache is for the server; a re-preparation should not fill it)."""

    def __init__(self, avatar: Avatar) -> None:
        self._avatar = avatar
        self._jpeg: np.ndarray | None = None
        if (avatar.path / FRAMES_FILE).is_file():
            self._offsets = np.load(avatar.path / INDEX_FILE)
            self._jpeg = np.memmap(avatar.path / FRAMES_FILE, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return self._avatar.num_frames

    def __getitem__(self, index: int) -> np.ndarray:
        if self._jpeg is None:  # format 1: raw frames.npy, memory-mapped
            return np.asarray(self._avatar.frames[index])
        raw = self._jpeg[self._offsets[index] : self._offsets[index + 1]]
        bgr = cv2.imdecode(np.asarray(raw), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{self._avatar.path / FRAMES_FILE}: frame {index} is damaged; prepare the avatar again with replace")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# ---- preparation ----------------------------------------------------------------------


def _prepare_full(
    data_dir: Path,
    name: str,
    info: SourceInfo,
    params: FrameParams,
    settings: DetectorSettings,
    progress: ProgressCallback | None,
) -> tuple[Avatar, list[str]]:
    meta: dict[str, Any] = {"builder": BUILDER, "source": info.name, "kind": info.kind}
    scratch = _Scratch(data_dir, name)
    try:
        if info.kind == "video":
            frames, cut = _decode_video(info, params, scratch, progress, meta)
        else:
            frames, cut = _read_pictures(info, params, scratch, progress, meta)
        scale = meta["source_size"][0] / frames.shape[2]
        if len(frames) == 1:
            # A picture (or a one-frame video) is a still: give it idle motion.
            frames, landmarks, report = _animate_still(np.ascontiguousarray(frames[0]), info, params, settings, scale, progress)
            meta.update(kind="image", idle_motion=asdict(IdleMotion(fps=params.fps, num_frames=len(frames))))
        else:
            points = track_points(frames, settings, progress)
            report = check_faces(frames, points, settings, scale, progress)
            _refuse_unless_usable(report, info)
            landmarks = carry_landmarks(points[..., :2], report.has_face)
        meta.update(_face_meta(report, landmarks))
        meta["prepare"] = _record(info, params, settings, cut)
        stage = StageProgress(progress, "save", len(frames))
        avatar = save_avatar(data_dir, name, frames, landmarks, fps=params.fps, meta=meta)
        stage.finish()
    finally:
        scratch.close()
    return avatar, _warn(report, name)


def _animate_still(
    still: np.ndarray,
    info: SourceInfo,
    params: FrameParams,
    settings: DetectorSettings,
    scale: float,
    progress: ProgressCallback | None,
) -> tuple[np.ndarray, np.ndarray, FaceReport]:
    stage = StageProgress(progress, "landmarks", 1)
    points = still_points(still, settings)
    stage.finish()
    report = check_faces([still], points[None], settings, scale, progress)
    _refuse_unless_usable(report, info)
    motion = IdleMotion(fps=params.fps, num_frames=max(2, round(4.0 * params.fps)))
    frames, landmarks = synthesize_idle(still, np.ascontiguousarray(points[:, :2]), motion)
    # Every idle frame is the still moved: its verdict holds for all of them.
    report = FaceReport(report.faces * len(frames), settings)
    return frames, landmarks, report


def _redo_landmarks(
    data_dir: Path,
    existing: Avatar,
    info: SourceInfo,
    params: FrameParams,
    settings: DetectorSettings,
    progress: ProgressCallback | None,
) -> tuple[Avatar, list[str]]:
    frames = _StoredFrames(existing)
    source_size = existing.meta.get("source_size") or [existing.width, existing.height]
    scale = float(source_size[0]) / existing.width
    points = track_points(frames, settings, progress)
    report = check_faces(frames, points, settings, scale, progress)
    _refuse_unless_usable(report, info)
    landmarks = carry_landmarks(points[..., :2], report.has_face)
    record = dict(existing.meta["prepare"])
    record.update(source=info.record(), detector=settings.record())
    meta = {**_face_meta(report, landmarks), "prepare": record, "source": info.name}
    avatar = update_avatar(data_dir, existing.name, landmarks=landmarks, meta=meta)
    return avatar, _warn(report, existing.name)


def _refuse_unless_usable(report: FaceReport, info: SourceInfo) -> None:
    problem = report.refusal(info.name)
    if problem is not None:
        raise NoUsableFace(problem)


def _warn(report: FaceReport, name: str) -> list[str]:
    warnings = report.warnings()
    for w in warnings:
        log.warning("avatar %r: %s", name, w)
    return warnings


def _face_meta(report: FaceReport, landmarks: np.ndarray) -> dict[str, Any]:
    has_face = report.has_face
    carried = np.flatnonzero(~has_face)
    faces = report.summary()
    faces["box"] = median_box(landmarks[has_face])
    faces["bbox_shift_v1"] = list(bbox_shift_range(landmarks[has_face]))
    return {"faces": faces, "carried_frames": index_ranges(carried), "frames_without_face": len(carried)}


# ---- landmarks ------------------------------------------------------------------------


def _mesh(settings: DetectorSettings, video: bool) -> FaceMeshDetector:
    return FaceMeshDetector(
        video=video,
        detection_confidence=settings.mesh_detection_confidence,
        tracking_confidence=settings.mesh_tracking_confidence,
    )


def still_landmarks(image: np.ndarray, settings: DetectorSettings | None = None) -> np.ndarray:
    """Landmarks of the face in one picture, (478, 2), NaN if none; looks in crops too
    when the face is too small for the detector in the whole picture."""
    return np.ascontiguousarray(still_points(image, settings)[:, :2])


def still_points(image: np.ndarray, settings: DetectorSettings | None = None) -> np.ndarray:
    """As :func:`still_landmarks`, with the depth: (478, 3)."""
    with _mesh(settings or DetectorSettings(), video=False) as det:
        pts = det.points3d(image)
        if np.isfinite(pts[0, 0]):
            return pts
        return _search_crops(det, image)


def video_landmarks(
    frames: Frames | np.ndarray, settings: DetectorSettings | None = None, progress: ProgressCallback | None = None
) -> np.ndarray:
    """Landmarks for every frame, (N, 478, 2), NaN rows where no face was found."""
    return np.ascontiguousarray(track_points(frames, settings, progress)[..., :2])


def track_points(
    frames: Frames | np.ndarray, settings: DetectorSettings | None = None, progress: ProgressCallback | None = None
) -> np.ndarray:
    """Mesh points for every frame, (N, 478, 3) (x, y in pixels, depth), NaN rows where
    no face was found.

    MediaPipe's face detector is a short-range model that sees the picture at 128x128, so
    in a wide shot (a bust in a 16:9 frame) it misses a face under ~10% of the width. So
    when the whole-frame pass misses any frame, the face is located (from the frames that
    worked, else by searching crops of a few frames) and a second tracking pass runs on a
    square crop around it; each frame keeps the better of the two answers."""
    settings = settings or DetectorSettings()
    n = len(frames)
    h, w = np.asarray(frames[0]).shape[:2]
    full = np.empty((n, NUM_LANDMARKS, 3), np.float32)
    stage = StageProgress(progress, "landmarks", n)
    with _mesh(settings, video=True) as det:
        for i in range(n):
            full[i] = det.points3d(np.asarray(frames[i]))
            stage.step()
    stage.finish()
    found = np.isfinite(full[:, 0, 0])
    if found.all():
        return full
    if found.any():
        pts = full[found, :, :2].reshape(-1, 2)
    else:
        pts = np.empty((0, 2), np.float32)
        with _mesh(settings, video=False) as det:
            for k in np.unique(np.linspace(0, n - 1, min(n, 5)).round().astype(int)):
                lm = _search_crops(det, np.ascontiguousarray(frames[int(k)]))
                if np.isfinite(lm[0, 0]):
                    pts = lm[:, :2]
                    break
    if len(pts) == 0:
        return full
    box = _face_square(pts, w, h)
    if box is None:  # the crop would be most of the frame: no better than the first pass
        return full
    x0, y0, side = box
    log.info("face is small in the frame: tracking it again in a %dx%d crop at (%d, %d)", side, side, x0, y0)
    crop = np.empty_like(full)
    stage = StageProgress(progress, "closer look", n)
    with _mesh(settings, video=True) as det:
        for i in range(n):
            crop[i] = det.points3d(np.ascontiguousarray(np.asarray(frames[i])[y0 : y0 + side, x0 : x0 + side]))
            stage.step()
    stage.finish()
    crop += np.array([x0, y0, 0], np.float32)
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
    points (478, 3) in whole-image pixels of the first crop that has one, else NaN."""
    h, w = image.shape[:2]
    for side in (min(h, w), min(h, w) // 2):
        if side < 64:
            break
        for y0 in _starts(h, side):
            for x0 in _starts(w, side):
                if side == min(h, w) and (w == h):
                    continue  # the whole picture, already tried
                pts = det.points3d(np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side]))
                if np.isfinite(pts[0, 0]):
                    return pts + np.array([x0, y0, 0], np.float32)
    return np.full((NUM_LANDMARKS, 3), np.nan, np.float32)


def _starts(length: int, side: int) -> list[int]:
    """Window starts covering ``length`` with windows of ``side``, overlapping by half."""
    if side >= length:
        return [0]
    count = math.ceil((length - side) / (side / 2)) + 1
    return sorted({round(i * (length - side) / (count - 1)) for i in range(count)})


# ---- what the command line prints ---------------------------------------------------


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def summary(result: PrepareResult) -> str:
    """What the operator wants to know after ``prepare``: frames, size, the face, the
    frames without one and MuseTalk v1.0's bbox_shift range."""
    a = result.avatar
    meta = a.meta
    record = meta.get("prepare", {})
    source = record.get("source", {}).get("name") or meta.get("source", "?")
    if result.action == UP_TO_DATE:
        head = f"avatar {a.name!r} is up to date (same source {source}, same parameters): nothing to do"
    elif result.action == LANDMARKS_ONLY:
        head = f"avatar {a.name!r}: landmarks made again for its stored frames (detector settings changed) in {result.seconds:.1f} s"
    else:
        head = f"avatar {a.name!r} prepared from {source} in {result.seconds:.1f} s"
    lines = [head]
    seconds = a.num_frames / a.fps
    cut = " (cut at max_seconds)" if record.get("cut") else ""
    lines.append(
        f"  frames      {a.num_frames} = {seconds:.1f} s at {a.fps} fps{cut}, {a.width}x{a.height}, "
        f"{disk_bytes(a.path) / 1e6:.1f} MB on disk"
    )
    faces = meta.get("faces", {})
    box = faces.get("box")
    if box:
        x1, y1, x2, y2 = box
        width = faces.get("median_width_px")
        lines.append(
            f"  face box    x1={x1} y1={y1} x2={x2} y2={y2} (median over frames, {x2 - x1}x{y2 - y1} px"
            + (f"; {width:.0f} px cheek to cheek in the source" if width else "")
            + ")"
        )
    carried = meta.get("carried_frames", [])
    count = int(meta.get("frames_without_face", 0))
    if count:
        runs = ", ".join(f"{first}-{last}" if last > first else f"{first}" for first, last in carried[:8])
        runs += ", ..." if len(carried) > 8 else ""
        lines.append(f"  no face     {count} frames, landmarks carried from their neighbours: {runs}")
    else:
        lines.append("  no face     0 frames: a face in every frame")
    shift = faces.get("bbox_shift_v1")
    if shift:
        lines.append(
            f"  bbox_shift  MuseTalk v1.0: {shift[0]} to +{shift[1]} makes sense for this face "
            f"(0 is the default; v1.5 ignores it)"
        )
    lines.extend(f"  warning     {w}" for w in result.warnings)
    return "\n".join(lines) + "\n"
