"""Test sources for avatar preparation: a face that moves, frames without one, videos."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 25, crf: int = 18) -> Path:
    """H.264 mp4 of RGB frames (even sizes)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(crf)}
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(stream.encode(None))
    return path


def move(img: np.ndarray, dx: float, dy: float = 0.0, scale: float = 1.0, size: tuple[int, int] | None = None) -> np.ndarray:
    """``img`` scaled about its centre and shifted, on a canvas of ``size`` (w, h)."""
    h, w = img.shape[:2]
    out_w, out_h = size or (w, h)
    m = np.asarray(cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale), np.float64)
    m[:, 2] += [dx + (out_w - w) / 2, dy + (out_h - h) / 2]
    return cv2.warpAffine(img, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass
class FaceClip:
    """A clip of a face moving and growing, with frames that have no face: blank, noise,
    and a stretch where a rectangle covers the face."""

    frames: list[np.ndarray]
    without_face: list[int] = field(default_factory=list)


def face_clip(still: np.ndarray, face_box: tuple[int, int, int, int], n: int = 40, seed: int = 0) -> FaceClip:
    """``n`` frames of ``still`` (the default avatar's astronaut): frames 0-1 blank,
    16-17 noise, 26-29 the face covered; everywhere else the face drifts right by 1.5 px
    a frame and grows from 100% to 120%. ``face_box`` (x1, y1, x2, y2 in ``still``)
    places the cover."""
    rng = np.random.default_rng(seed)
    h, w = still.shape[:2]
    blank = {0, 1}
    noise = {16, 17}
    covered = set(range(26, 30))
    frames = []
    for k in range(n):
        scale = 1.0 + 0.2 * k / (n - 1)
        dx = 1.5 * k - 20
        frame = move(still, dx, 0.0, scale)
        if k in blank:
            frame = np.full_like(still, 128)
        elif k in noise:
            frame = rng.integers(0, 256, still.shape, dtype=np.uint8)
        elif k in covered:
            # The face's box, moved and scaled with the frame, grown by a fifth: no eye,
            # nose or mouth shows.
            m = np.asarray(cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, scale), np.float64)
            m[:, 2] += [dx, 0.0]
            x1, y1, x2, y2 = face_box
            (ax, ay), (bx, by) = (m @ np.array([[x1, y1, 1.0], [x2, y2, 1.0]]).T).T
            pad_x, pad_y = 0.2 * (bx - ax), 0.2 * (by - ay)
            frame = frame.copy()
            cv2.rectangle(frame, (int(ax - pad_x), int(ay - pad_y)), (int(bx + pad_x), int(by + pad_y)), (70, 90, 110), -1)
        frames.append(np.ascontiguousarray(frame))
    return FaceClip(frames, sorted(blank | noise | covered))
