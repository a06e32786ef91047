"""Where the default avatar's mouth is, and how open a mouth is: the measures the tests
and the benchmarks apply to *output* frames (an independent face-mesh detector looking at
what a client received, not the landmarks the engine was given)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from avatars.landmarks import FOREHEAD, LOWER_INNER_LIP, NOSE_TIP, UPPER_INNER_LIP

# The default avatar's lower face in its 512x512 frame (mouth near x 222, y 145):
# x, y, width, height.
DEFAULT_MOUTH_ROI = (180, 120, 90, 70)


def lower_face(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """The default avatar's mouth region of an RGB frame, as float32."""
    x, y, w, h = DEFAULT_MOUTH_ROI
    return image[y : y + h, x : x + w].astype(np.float32)


def face_scale(lm: npt.NDArray[np.floating]) -> float:
    """A size that does not move with the mouth: forehead-to-nose-tip distance."""
    return float(np.linalg.norm(lm[FOREHEAD] - lm[NOSE_TIP]))


def mouth_opening(lm: npt.NDArray[np.floating]) -> float:
    """Inner-lip gap over face scale; NaN when there is no face."""
    if not np.isfinite(lm[0, 0]):
        return float("nan")
    return float(np.linalg.norm(lm[UPPER_INNER_LIP] - lm[LOWER_INNER_LIP]) / max(face_scale(lm), 1e-6))
