"""Face landmarks from MediaPipe's face mesh, whose model ships inside the mediapipe wheel
(0.10.21), so avatars can be prepared with no download.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

NUM_LANDMARKS = 478

# MediaPipe face-mesh indices used across the project.
UPPER_INNER_LIP = 13
LOWER_INNER_LIP = 14
UPPER_OUTER_LIP = 0
LOWER_OUTER_LIP = 17
MOUTH_LEFT = 61
MOUTH_RIGHT = 291
CHIN = 152
FOREHEAD = 10
NOSE_TIP = 1
LIPS_OUTER = [61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185]
LIPS_INNER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191]
FACE_OVAL = [
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
]
LEFT_EYE_UPPER = [246, 161, 160, 159, 158, 157, 173]
LEFT_EYE_LOWER = [33, 7, 163, 144, 145, 153, 154, 155, 133]
RIGHT_EYE_UPPER = [466, 388, 387, 386, 385, 384, 398]
RIGHT_EYE_LOWER = [263, 249, 390, 373, 374, 380, 381, 382, 362]


class FaceMeshDetector:
    """Thin wrapper over ``mediapipe.solutions.face_mesh``; RGB uint8 frames in,
    (478, 2) pixel coordinates out (NaN when no face)."""

    def __init__(self, video: bool = True, detection_confidence: float = 0.5, tracking_confidence: float = 0.5) -> None:
        try:
            import mediapipe as mp
        except ImportError as exc:  # pragma: no cover - base dependency
            raise RuntimeError(
                "face landmarks need mediapipe==0.10.21 (the last release that ships its face "
                "mesh): pip install 'mediapipe==0.10.21'"
            ) from exc
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video,
            max_num_faces=1,
            refine_landmarks=True,
            min_detection_confidence=detection_confidence,
            min_tracking_confidence=tracking_confidence,
        )

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.points3d(frame)[:, :2])

    def points3d(self, frame: np.ndarray) -> np.ndarray:
        """(478, 3): x, y in pixels and the depth z in the same units as x (smaller is
        nearer the camera), NaN when no face. The depth tells which way the head turns."""
        h, w = frame.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return np.full((NUM_LANDMARKS, 3), np.nan, np.float32)
        pts = result.multi_face_landmarks[0].landmark
        return np.array([[p.x * w, p.y * h, p.z * w] for p in pts], np.float32)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceMeshDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_landmarks(frames: Iterable[np.ndarray], video: bool = True) -> np.ndarray:
    """Landmarks for every frame, (N, 478, 2)."""
    with FaceMeshDetector(video=video) as det:
        return np.stack([det(f) for f in frames])


def iter_landmarks(frames: Iterable[np.ndarray], video: bool = True) -> Iterator[np.ndarray]:
    with FaceMeshDetector(video=video) as det:
        for f in frames:
            yield det(f)
