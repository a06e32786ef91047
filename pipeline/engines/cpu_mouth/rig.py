"""An avatar frame's lower face as the painter needs it, worked out from the face
landmarks once per avatar frame (nothing here depends on the audio)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from avatars.landmarks import FACE_OVAL, LOWER_INNER_LIP, UPPER_INNER_LIP

from .curves import F32

F64: TypeAlias = npt.NDArray[np.float64]

# Inner-lip contours from corner to corner, upper and lower paired point by point
# (the mesh is symmetric, so the i-th upper point sits above the i-th lower one).
_INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
_INNER_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
_OUTER_LEFT, _OUTER_RIGHT = 61, 291
_OUTER_LOWER = 17
_SUBNASALE = 2


@dataclass(frozen=True)
class Rig:
    """Everything about one avatar frame's lower face that does not depend on audio.

    Local coordinates: ``u`` along the mouth (left corner to right corner), ``v`` down
    the face, origin between the inner lips; ``v' = v - lower(u)`` is the height above or
    below the lower inner lip, where the face splits when the jaw drops.
    """

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the region that may change
    mouth: tuple[int, int, int, int]  # where the opening may be painted, within box
    origin: tuple[float, float]
    eu: tuple[float, float]
    ev: tuple[float, float]
    lower_poly: F32  # lower inner lip v(u), quartic, valid over [u_lo, u_hi]
    rest_gap: float  # inner-lip gap at rest, mid-mouth
    u_lo: float
    u_hi: float
    inner_half: tuple[float, float]  # inner-lip half widths, left and right
    outer_half: tuple[float, float]  # outer-lip half widths (corner to centre)
    face_half: tuple[float, float]  # face-oval half widths at mouth height
    chin_poly: F32  # jaw line v'(u), quartic over the lower face oval
    chin_lo: float
    chin_hi: float
    nose: float  # distance from the lower inner lip up to the nose base
    nose_v: float  # v of the nose base
    chin: float  # distance from the lower inner lip down to the chin
    lip: float  # lower-lip thickness
    mouth_width: float  # outer corner to corner


def smooth_landmarks(lm: F64, sigma: float = 1.0) -> F64:
    """Gaussian smoothing over time, across frames that have a face only, so the painted
    mouth does not jitter with the detector from one avatar frame to the next."""
    n = lm.shape[0]
    if n < 3 or sigma <= 0:
        return lm.copy()
    radius = math.ceil(2 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    valid = np.isfinite(lm[:, 0, 0])
    out = lm.copy()
    filled = np.where(valid[:, None, None], lm, 0.0)
    for i in np.flatnonzero(valid):
        lo, hi = max(0, i - radius), min(n, i + radius + 1)
        w = kernel[lo - i + radius : hi - i + radius] * valid[lo:hi]
        out[i] = np.tensordot(w, filled[lo:hi], axes=1) / w.sum()
    return out


def build_rig(lm: F64, width: int, height: int, max_open: float, max_lift: float, max_spread: float) -> Rig | None:
    """The rig of one frame's landmarks ``lm`` (478, 2) in a ``width`` x ``height`` image,
    sized for the largest motion the engine's options allow; None without a usable face."""
    if not np.all(np.isfinite(lm[_INNER_UPPER + _INNER_LOWER + FACE_OVAL])):
        return None
    lm = lm.astype(np.float64)
    axis = lm[_OUTER_RIGHT] - lm[_OUTER_LEFT]
    mouth_width = float(np.linalg.norm(axis))
    if mouth_width < 4.0:
        return None  # too small a face to animate
    eu = axis / mouth_width
    ev = np.array([-eu[1], eu[0]])  # y grows down the image, so this points chin-wards
    origin = 0.5 * (lm[UPPER_INNER_LIP] + lm[LOWER_INNER_LIP])

    def local(points: F64) -> tuple[F64, F64]:
        d = points - origin
        return d @ eu, d @ ev

    uu, vu = local(lm[_INNER_UPPER])
    ul, vl = local(lm[_INNER_LOWER])
    # The jaw side of the face starts at the lower inner lip: whatever shows between
    # the lips at rest (usually upper teeth) stays with the upper jaw.
    lower_poly = np.polyfit(ul, vl, 4)  # a U with steep corners: a parabola misses by ~1 px
    u_lo, u_hi = float(min(ul.min(), uu.min())), float(max(ul.max(), uu.max()))
    rest_gap = max(float(vl[5] - vu[5]), 0.0)
    inner_half = (max(-u_lo, 2.0), max(u_hi, 2.0))
    (cu,), _ = local(lm[[_OUTER_LEFT]])
    (cu2,), _ = local(lm[[_OUTER_RIGHT]])
    outer_half = (max(-float(cu), inner_half[0]), max(float(cu2), inner_half[1]))

    ou, ov = local(lm[FACE_OVAL])
    ov_rel = ov - np.polyval(lower_poly, np.clip(ou, u_lo, u_hi))
    # Face-oval width where the lips meet: the oval points nearest that height.
    left = ou < 0

    def side_width(mask: npt.NDArray[np.bool_]) -> float:
        k = np.argsort(np.abs(ov_rel[mask]))[:2]
        return float(np.mean(np.abs(ou[mask][k])))

    face_half = (
        max(side_width(left), outer_half[0] * 1.3),
        max(side_width(~left), outer_half[1] * 1.3),
    )
    low = ov_rel > 0
    chin_u, chin_v = ou[low], ov_rel[low]
    deg = 4 if chin_u.size >= 6 else 2
    chin_poly = np.polyfit(chin_u, chin_v, deg)

    nu, nv = local(lm[[_SUBNASALE]])
    nose = max(-(float(nv[0]) - float(np.polyval(lower_poly, np.clip(nu[0], u_lo, u_hi)))), 3.0)
    chin = max(float(np.polyval(chin_poly, 0.0)), 6.0)
    _, lv = local(lm[[_OUTER_LOWER]])
    lip = max(float(lv[0]) - float(np.polyval(lower_poly, 0.0)), 2.0)

    # The region that may change, in local coordinates, then as an image box.
    jaw = max_open * mouth_width
    margin = 0.15 * mouth_width

    def image_box(u0: float, v0: float, u1: float, v1: float) -> tuple[int, int, int, int]:
        corners = np.array([[u0, v0], [u1, v0], [u0, v1], [u1, v1]])
        pts = origin + corners[:, :1] * eu + corners[:, 1:] * ev
        bx0, by0 = np.floor(pts.min(0)).astype(int)
        bx1, by1 = np.ceil(pts.max(0)).astype(int) + 1
        return max(int(bx0), 0), max(int(by0), 0), min(int(bx1), width), min(int(by1), height)

    nose_v = float(nv[0])
    # Below the chin the drop fades out over 0.6 chin (see paint.warp), after a drop of <= jaw.
    bottom = float(np.polyval(lower_poly, 0.0)) + 1.6 * chin + jaw + margin
    x0, y0, x1, y1 = image_box(-face_half[0] - margin, nose_v - margin, face_half[1] + margin, bottom)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    # Where the opening can be painted (widest spread, highest lift, deepest drop),
    # relative to the region box, so painting touches only this small part.
    reach = 1.0 + max_spread
    mx0, my0, mx1, my1 = image_box(
        -outer_half[0] * reach - 3.0, float(vl.min()) - max_lift * jaw - 3.0,
        outer_half[1] * reach + 3.0, float(vl.max()) + jaw + 3.0,
    )
    mouth = (
        min(max(mx0 - x0, 0), x1 - x0), min(max(my0 - y0, 0), y1 - y0),
        min(max(mx1 - x0, 0), x1 - x0), min(max(my1 - y0, 0), y1 - y0),
    )
    return Rig(
        box=(x0, y0, x1, y1),
        mouth=mouth,
        origin=(float(origin[0]), float(origin[1])),
        eu=(float(eu[0]), float(eu[1])),
        ev=(float(ev[0]), float(ev[1])),
        lower_poly=lower_poly.astype(np.float32),
        rest_gap=rest_gap,
        u_lo=u_lo,
        u_hi=u_hi,
        inner_half=inner_half,
        outer_half=outer_half,
        face_half=face_half,
        chin_poly=chin_poly.astype(np.float32),
        chin_lo=float(chin_u.min()),
        chin_hi=float(chin_u.max()),
        nose=nose,
        nose_v=nose_v,
        chin=chin,
        lip=lip,
        mouth_width=mouth_width,
    )
