"""Is there a real human face in a source, and is it fit to become an avatar?

MediaPipe's face mesh always answers with a face-shaped set of points once its own
detector has fired, and that detector fires on things that are not human faces (in
scikit-image's cat photo the mesh lands on the cat's eye). So every frame's mesh is
checked three ways:

* a second, independent detector (MediaPipe's BlazeFace face *detection*, short range
  then full range) looks at a square around the mesh and must find a human face there,
  with its eyes where the mesh put them, scoring at least ``min_face_score``;
* the mesh itself must have a plausible shape: eyes above the nose above the mouth
  (the face at most 60 degrees from upright), and eyes set as far apart as a human
  face's width allows;
* the face must be large enough (in the source's own pixels) and not turned away: the
  head's yaw comes from the mesh's depth (the line from cheek to cheek).

Frames failing the first two have no face: their landmarks are carried from their
neighbours (:func:`carry_landmarks`). A small or turned face keeps its landmarks, but
a source needs a usable face in at least ``min_face_share`` of its frames, else it is
refused with what was wrong (:meth:`FaceReport.refusal`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from .progress import ProgressCallback, StageProgress

# Face-mesh indices (the subject's right is the image's left).
_RIGHT_EYE = (33, 133)  # outer and inner corner
_LEFT_EYE = (362, 263)
_RIGHT_CHEEK = 234  # the face's outline at the ears' height
_LEFT_CHEEK = 454
_NOSE_TIP = 1
_MOUTH = (13, 14)  # inner lips, upper and lower
# MuseTalk's nose-bridge landmarks 28, 29, 30 of the iBUG 68 scheme, as the engine maps
# them (pipeline.engines.musetalk.material.MEDIAPIPE_TO_68; importing it would pull torch).
BRIDGE_28 = (197, 195)
BRIDGE_29 = (5,)
BRIDGE_30 = (4,)

DETECT_CROP = 3.0  # the square shown to BlazeFace, in face sizes: its short-range model wants the face at ~1/3
MAX_EYE_ERROR = 0.5  # BlazeFace's eyes this far (in eye distances) from the mesh's: another face
MAX_ROLL_DEG = 60.0
INTEROCULAR = (0.3, 0.7)  # eye-centre distance / cheek-to-cheek width; ~0.46 on a frontal human face

# Per-frame verdicts.
OK = "ok"
NO_FACE = "no-face"  # the mesh found nothing
NOT_HUMAN = "not-human"  # the mesh found something the face detector does not take for a human face
ODD_SHAPE = "odd-shape"  # the mesh's eyes, nose and mouth are out of order
SMALL = "small"
TURNED = "turned"
WITH_FACE = frozenset({OK, SMALL, TURNED})


class Frames(Protocol):
    """Frames read one at a time: an (N, H, W, 3) array, or an avatar's stored JPEGs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class DetectorSettings:
    """Everything that decides an avatar's landmarks and which frames have a face;
    recorded with the avatar, so a change re-prepares its landmarks."""

    landmarks: str = "mediapipe-face-mesh"
    mesh_detection_confidence: float = 0.5
    mesh_tracking_confidence: float = 0.5
    # BlazeFace scores 0.79-0.97 on the astronaut portrait however it is darkened, blurred,
    # noised, rotated or shrunk, and at most 0.66 on scikit-image's cat photo.
    min_face_score: float = 0.75
    min_face_px: int = 80  # cheek to cheek, in the source's pixels: MuseTalk upsamples the face to 256
    max_yaw_deg: float = 40.0  # scikit-image's cameraman, a three-quarter view, is 51
    min_face_share: float = 0.5

    def record(self) -> dict[str, Any]:
        return asdict(self)


def good_source_advice(settings: DetectorSettings) -> str:
    return (
        f"A good source shows one real human face, frontal (turned at most {settings.max_yaw_deg:.0f} degrees), "
        f"at least {settings.min_face_px} px wide, evenly lit, in at least {settings.min_face_share:.0%} of its frames."
    )


class NoUsableFace(ValueError):
    """The source has no face fit for an avatar; the message says why and what would do."""


@dataclass(frozen=True)
class FrameFace:
    """One frame's verdict, with what it was based on."""

    status: str
    score: float = 0.0  # BlazeFace's confidence at the mesh's face (0 when not run)
    width_px: float = 0.0  # cheek to cheek, in source pixels
    yaw_deg: float = 0.0  # + or - : which way the head turns

    @property
    def has_face(self) -> bool:
        return self.status in WITH_FACE


def face_width(lm: np.ndarray) -> float:
    """Cheek-to-cheek distance in pixels (the same whatever the roll)."""
    return float(np.linalg.norm(lm[_LEFT_CHEEK, :2] - lm[_RIGHT_CHEEK, :2]))


def yaw_degrees(pts3d: np.ndarray) -> float:
    """How far the head turns left or right, from the mesh's depth along the line from
    cheek to cheek (0 = facing the camera)."""
    v = pts3d[_LEFT_CHEEK] - pts3d[_RIGHT_CHEEK]
    return math.degrees(math.atan2(float(v[2]), math.hypot(float(v[0]), float(v[1]))))


def geometry_problem(lm: np.ndarray) -> str | None:
    """Why the mesh's 2-D points are not a plausible upright human face, or None."""
    right_eye, left_eye = lm[list(_RIGHT_EYE), :2].mean(axis=0), lm[list(_LEFT_EYE), :2].mean(axis=0)
    eyes = (right_eye + left_eye) / 2
    mouth = lm[list(_MOUTH), :2].mean(axis=0)
    up = eyes - mouth  # image y grows downward, so an upright face has up[1] < 0
    length = float(np.linalg.norm(up))
    if length < 1e-3:
        return "eyes on the mouth"
    if -up[1] / length < math.cos(math.radians(MAX_ROLL_DEG)):
        return "the face is not upright"
    along = float(np.dot(lm[_NOSE_TIP, :2] - mouth, up)) / length**2
    if not 0.05 < along < 1.0:
        return "the nose is not between the eyes and the mouth"
    width = face_width(lm)
    if width < 1e-3 or not INTEROCULAR[0] <= float(np.linalg.norm(left_eye - right_eye)) / width <= INTEROCULAR[1]:
        return "eyes too close or too far apart for the face's width"
    return None


class FaceChecker:
    """Checks frames one by one (holds MediaPipe's two face-detection models)."""

    def __init__(self, settings: DetectorSettings) -> None:
        self.settings = settings
        self._models: dict[int, Any] = {}

    def _model(self, selection: int) -> Any:
        if selection not in self._models:
            import mediapipe as mp

            # Low on purpose: the score is compared with min_face_score here, and a
            # near miss is worth reporting.
            self._models[selection] = mp.solutions.face_detection.FaceDetection(
                model_selection=selection, min_detection_confidence=0.3
            )
        return self._models[selection]

    def detection_score(self, frame: np.ndarray, lm: np.ndarray) -> float:
        """BlazeFace's best score for a face whose eyes sit where the mesh put them, in a
        square around the mesh (0 when it finds none)."""
        h, w = frame.shape[:2]
        lo, hi = lm[:, :2].min(axis=0), lm[:, :2].max(axis=0)
        side = DETECT_CROP * float(max(hi - lo))
        cx, cy = (lo + hi) / 2
        x0, y0 = max(0, math.floor(cx - side / 2)), max(0, math.floor(cy - side / 2))
        x1, y1 = min(w, math.ceil(cx + side / 2)), min(h, math.ceil(cy + side / 2))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return 0.0
        crop = np.ascontiguousarray(frame[y0:y1, x0:x1])
        ch, cw = crop.shape[:2]
        right_eye, left_eye = lm[list(_RIGHT_EYE), :2].mean(axis=0), lm[list(_LEFT_EYE), :2].mean(axis=0)
        eye_dist = max(float(np.linalg.norm(left_eye - right_eye)), 1.0)
        best = 0.0
        for selection in (0, 1):  # short range first (faster, and better on a crop); full range if it misses
            result = self._model(selection).process(crop)
            for det in result.detections or []:
                kp = det.location_data.relative_keypoints
                a = np.array([x0 + kp[0].x * cw, y0 + kp[0].y * ch])
                b = np.array([x0 + kp[1].x * cw, y0 + kp[1].y * ch])
                error = min(
                    np.linalg.norm(a - right_eye) + np.linalg.norm(b - left_eye),
                    np.linalg.norm(a - left_eye) + np.linalg.norm(b - right_eye),
                ) / (2 * eye_dist)
                if error <= MAX_EYE_ERROR:
                    best = max(best, float(det.score[0]))
            if best >= self.settings.min_face_score:
                break
        return best

    def check(self, frame: np.ndarray, pts: np.ndarray, scale: float = 1.0) -> FrameFace:
        """The verdict on one RGB frame and its mesh points ((478, 2) or (478, 3), NaN
        when the mesh found nothing); ``scale`` turns frame pixels into source pixels."""
        if not np.isfinite(pts).all():
            return FrameFace(NO_FACE)
        width = face_width(pts) * scale
        yaw = yaw_degrees(pts) if pts.shape[1] >= 3 else 0.0
        # The detector first: on a cat the mesh is often misshapen too, and "not a human
        # face" is the more useful thing to say.
        score = self.detection_score(frame, pts)
        if score < self.settings.min_face_score:
            return FrameFace(NOT_HUMAN, score, width, yaw)
        if geometry_problem(pts) is not None:
            return FrameFace(ODD_SHAPE, score, width, yaw)
        if width < self.settings.min_face_px:
            return FrameFace(SMALL, score, width, yaw)
        if abs(yaw) > self.settings.max_yaw_deg:
            return FrameFace(TURNED, score, width, yaw)
        return FrameFace(OK, score, width, yaw)

    def close(self) -> None:
        for model in self._models.values():
            model.close()
        self._models.clear()

    def __enter__(self) -> FaceChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class FaceReport:
    """The verdicts on all of a source's frames."""

    faces: list[FrameFace]
    settings: DetectorSettings

    @property
    def has_face(self) -> np.ndarray:
        return np.array([f.has_face for f in self.faces], bool)

    def counts(self) -> dict[str, int]:
        c = Counter(f.status for f in self.faces)
        return {s: c.get(s, 0) for s in (OK, NO_FACE, NOT_HUMAN, ODD_SHAPE, SMALL, TURNED)}

    def refusal(self, source_name: str) -> str | None:
        """What is wrong with the source, or None when enough frames have a usable face."""
        n = len(self.faces)
        c = self.counts()
        if n and c[OK] >= math.ceil(self.settings.min_face_share * n - 1e-9):
            return None
        s = self.settings

        def where(k: int) -> str:
            return "" if n == 1 else f" in {k} of {n} frames"

        def median(status: str, value: str) -> float:
            return float(np.median([abs(getattr(f, value)) for f in self.faces if f.status == status]))

        reasons: list[tuple[int, str]] = []
        if c[NO_FACE]:
            reasons.append((c[NO_FACE], f"no face found{where(c[NO_FACE])}"))
        if c[NOT_HUMAN]:
            best = max(f.score for f in self.faces if f.status == NOT_HUMAN)
            reasons.append((c[NOT_HUMAN], (
                f"the face detector saw no human face where the face landmarks landed{where(c[NOT_HUMAN])} "
                f"(score {best:.2f}, need {s.min_face_score:.2f}): an animal, a drawing, a mask or a covered face?"
            )))
        if c[ODD_SHAPE]:
            reasons.append((c[ODD_SHAPE], f"the face landmarks do not form an upright human face{where(c[ODD_SHAPE])}"))
        if c[SMALL]:
            reasons.append((c[SMALL], (
                f"the face is too small{where(c[SMALL])}: {median(SMALL, 'width_px'):.0f} px wide, need at least "
                f"{s.min_face_px} px (use a closer shot or a larger video)"
            )))
        if c[TURNED]:
            reasons.append((c[TURNED], (
                f"the face is turned away from the camera{where(c[TURNED])}: about {median(TURNED, 'yaw_deg'):.0f} degrees, "
                f"at most {s.max_yaw_deg:.0f}"
            )))
        reasons.sort(key=lambda r: -r[0])
        text = "; ".join(r[1] for r in reasons) or "it has no frames"
        share = "" if n <= 1 else f" Only {c[OK]} of {n} frames have a usable face, {s.min_face_share:.0%} are needed."
        end = "" if text.endswith("?") else "."
        return f"no usable human face in {source_name}: {text}{end}{share} {good_source_advice(s)}"

    def warnings(self) -> list[str]:
        """Minor faults of an accepted source, worth telling the operator."""
        c, n = self.counts(), len(self.faces)
        out = []
        if c[SMALL]:
            out.append(f"the face is under {self.settings.min_face_px} px wide in {c[SMALL]} of {n} frames")
        if c[TURNED]:
            out.append(f"the face is turned more than {self.settings.max_yaw_deg:.0f} degrees in {c[TURNED]} of {n} frames")
        return out

    def summary(self) -> dict[str, Any]:
        """For avatar.json."""
        faces = [f for f in self.faces if f.has_face]
        out: dict[str, Any] = {"checked": len(self.faces), **self.counts()}
        if faces:
            out["median_width_px"] = round(float(np.median([f.width_px for f in faces])), 1)
            out["median_yaw_deg"] = round(float(np.median([f.yaw_deg for f in faces])), 1)
            out["median_score"] = round(float(np.median([f.score for f in faces])), 3)
        return out


def check_faces(
    frames: Frames | Sequence[np.ndarray] | np.ndarray,
    points: np.ndarray,
    settings: DetectorSettings,
    scale: float = 1.0,
    progress: ProgressCallback | None = None,
    checker: FaceChecker | None = None,
) -> FaceReport:
    """Verdicts for every frame and its mesh points ``(N, 478, 2 or 3)``."""
    stage = StageProgress(progress, "faces", len(points))
    own = checker is None
    checker = checker or FaceChecker(settings)
    try:
        faces = []
        for i in range(len(points)):
            faces.append(checker.check(np.asarray(frames[i]), points[i], scale))
            stage.step()
    finally:
        if own:
            checker.close()
    stage.finish()
    return FaceReport(faces, settings)


def carry_landmarks(landmarks: np.ndarray, has_face: np.ndarray) -> np.ndarray:
    """Landmarks for every frame: frames without a face get their neighbours' (linearly
    between the nearest frames with a face before and after, the nearest one's at either
    end of the clip). Needs at least one frame with a face."""
    good = np.flatnonzero(has_face)
    if len(good) == 0:
        raise ValueError("no frame has a face to carry landmarks from")
    out = np.array(landmarks, np.float32, copy=True)
    missing = np.flatnonzero(~np.asarray(has_face, bool))
    if len(missing) == 0:
        return out
    pos = np.searchsorted(good, missing)
    before = good[np.clip(pos - 1, 0, len(good) - 1)]  # the first face frame, before the first face
    after = good[np.clip(pos, 0, len(good) - 1)]  # the last face frame, after the last face
    t = np.where(after > before, (missing - before) / np.maximum(after - before, 1), 0.0).astype(np.float32)
    t = t[:, None, None]
    out[missing] = landmarks[before] * (1 - t) + landmarks[after] * t
    return out


def index_ranges(indices: Sequence[int] | np.ndarray) -> list[list[int]]:
    """[[first, last], ...] runs of consecutive indices (inclusive): short in avatar.json."""
    out: list[list[int]] = []
    for i in sorted(int(k) for k in indices):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def face_boxes(landmarks: np.ndarray) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 of each frame's landmarks (NaN where there are none)."""
    lm = np.asarray(landmarks, np.float32)[..., :2]
    with _no_nan_warning():
        lo, hi = np.nanmin(lm, axis=1), np.nanmax(lm, axis=1)
    return np.concatenate([lo, hi], axis=1)


def median_box(landmarks: np.ndarray) -> list[int]:
    boxes = face_boxes(landmarks)
    with _no_nan_warning():
        return [round(float(v)) for v in np.nanmedian(boxes, axis=0)]


def bbox_shift_range(landmarks: np.ndarray) -> tuple[int, int]:
    """MuseTalk v1.0's range for ``bbox_shift`` on this face, computed as its
    ``get_landmark_and_bbox`` reports it: down to minus the mean distance from nose-bridge
    point 29 to 30 (the crop's top nearer the mouth), up to plus the mean distance from
    28 to 29, over the frames given."""
    lm = np.asarray(landmarks, np.float32)
    y28 = lm[:, list(BRIDGE_28), 1].mean(axis=1)
    y29 = lm[:, list(BRIDGE_29), 1].mean(axis=1)
    y30 = lm[:, list(BRIDGE_30), 1].mean(axis=1)
    ok = np.isfinite(y28) & np.isfinite(y29) & np.isfinite(y30)
    if not ok.any():
        return 0, 0
    minus = int(float(np.mean(y30[ok] - y29[ok])))
    plus = int(float(np.mean(y29[ok] - y28[ok])))
    return -minus, plus


@contextlib.contextmanager
def _no_nan_warning() -> Iterator[None]:
    """All-NaN slices (frames without a face) are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
