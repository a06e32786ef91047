"""Drawing one frame: the lower face warped to a mouth pose with one ``cv2.remap``.

The lower lip and chin drop with the jaw (fading out at the face oval, under the chin
and towards the nose), the upper lip lifts a little, the corners move in or out, and the
mouth cavity (dark interior, a hint of upper teeth, a tongue shade) is painted into the
gap between the lips, because stretching closed lips alone shows no opening. Motion
fades to zero at the edges of the rig's box, so only that box changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np

from pipeline.engines.base import Frame

from .curves import F32, polyval, smoothstep
from .features import MouthFeature
from .rig import Rig

_EPS = 1e-6


@dataclass(frozen=True)
class PaintOptions:
    """How far the face moves at the extremes of a pose, and what shows in the opening."""

    max_open: float  # jaw drop at full opening, as a fraction of the mouth width
    upper_lip: float  # upper-lip lift, as a fraction of the jaw drop
    spread: float  # corners out for "ee", as a fraction of half the mouth width
    pucker: float  # corners in for "oo", likewise
    teeth: bool  # draw a hint of upper teeth in the opening


def warp(frame: Frame, out: Frame, rig: Rig, f: MouthFeature, opts: PaintOptions, xs: F32, ys: F32) -> None:
    """Draw ``frame`` with its lower face in pose ``f`` into ``out`` (only ``rig.box`` is
    written; the rest of ``out`` is left as it is). ``xs``/``ys`` are the frame's pixel
    coordinates, 0..W-1 and 0..H-1 as float32."""
    x0, y0, x1, y1 = rig.box
    ox, oy = rig.origin
    eux, euy = rig.eu
    evx, evy = rig.ev
    dx = xs[x0:x1] - np.float32(ox)
    dy = ys[y0:y1, None] - np.float32(oy)
    U = dx * np.float32(eux) + dy * np.float32(euy)
    V = dx * np.float32(evx) + dy * np.float32(evy)
    Vp = V - polyval(rig.lower_poly, np.clip(U, rig.u_lo, rig.u_hi))

    jaw = float(f.open) * opts.max_open * rig.mouth_width  # px
    width = float(np.clip(f.width - 0.3 * f.open, -1.0, 1.0))
    k = opts.spread if width > 0 else opts.pucker
    right = U > 0
    outer = np.where(right, np.float32(rig.outer_half[1]), np.float32(rig.outer_half[0]))
    corner = [width * k * h for h in rig.outer_half]  # corner shift, + outwards
    inner_d = np.where(
        right,
        np.float32(rig.inner_half[1] + corner[1]),
        np.float32(rig.inner_half[0] + corner[0]),
    )
    # Opening profile across the mouth: 1 in the middle, 0 at the corners.
    q = 1.0 - (U / inner_d) ** 2
    np.clip(q, 0.0, 1.0, out=q)
    p = np.sqrt(q)
    top = (-opts.upper_lip * jaw) * p
    bot = jaw * p

    # Jaw side: lips to chin move down, the chin a little less far than the lower
    # lip's middle; fades out at the face oval and below the chin.
    face = np.where(right, np.float32(rig.face_half[1]), np.float32(rig.face_half[0]))
    aU = np.abs(U)
    pc = 1.0 - smoothstep((aU - 0.35 * face) / (0.6 * face))
    t = np.clip((Vp - bot) / np.float32(rig.chin * 0.9), 0.0, 1.0)
    prof = p + (0.9 * pc - p) * t
    chin_v = polyval(rig.chin_poly, np.clip(U, rig.chin_lo, rig.chin_hi))
    fade = 1.0 - smoothstep((Vp - chin_v - jaw * 0.9 * pc) / np.float32(0.6 * rig.chin))
    dv_low = jaw * prof * fade
    # Lip side: the upper lip lifts, fading out towards the nose. Beside the mouth v'
    # follows the raised corners, so also fade by plain height: nothing at or above
    # the nose base moves.
    half = 0.5 * rig.rest_gap
    up = max(rig.nose - half, 2.0)
    below_nose = smoothstep((V - np.float32(rig.nose_v)) / np.float32(0.35 * up))
    dv_up = top * smoothstep(1.0 + (Vp - top) / np.maximum(top + np.float32(rig.nose), 1.0)) * below_nose
    dv = np.where(Vp >= bot, dv_low, np.where(Vp <= top, dv_up, Vp))

    # Corners in or out, dragging the cheeks, fading out to the face oval.
    au = aU / outer
    hx = np.where(au <= 1.0, au, 1.0 - smoothstep((aU - outer) / (face - outer)))
    # ...over a band covering both lips, fading out at the nose base and towards the
    # chin (v' is measured from the lower inner lip; vc from mid-mouth).
    vc = Vp + np.float32(half)
    band = min(rig.lip * 1.3, 0.5 * up)
    gy_up = 1.0 - smoothstep((-vc - band) / np.float32(up - band))
    gy_down = 1.0 - smoothstep((vc - band) / np.float32(max(0.8 * rig.chin - band, 1.0)))
    gy = np.where(vc < 0, gy_up * below_nose, gy_down)
    du = np.sign(U) * hx * gy * np.where(right, np.float32(corner[1]), np.float32(corner[0]))

    # Zero motion at the edges of the box, so the region drops back in seamlessly.
    window = edge_window(*dv.shape)
    du *= window
    dv *= window

    map_x = (dx + np.float32(ox)) - du * np.float32(eux) - dv * np.float32(evx)
    map_y = (dy + np.float32(oy)) - du * np.float32(euy) - dv * np.float32(evy)
    # remap keeps the source's dtype; its stubs only promise "some numeric array".
    warped = cast(
        Frame,
        cv2.remap(np.asarray(frame), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
    )
    if jaw > 0.5:
        mx0, my0, mx1, my1 = rig.mouth
        m = (slice(my0, my1), slice(mx0, mx1))
        _paint_cavity(warped[m], U[m], Vp[m], p[m], top[m], bot[m], rig, f, opts.teeth)
    out[y0:y1, x0:x1] = warped


def edge_window(h: int, w: int) -> F32:
    """(h, w) weights: 1 inside, easing to 0 over the outer twelfth of each side."""

    def ramp(n: int) -> F32:
        m = max(2, n // 12)
        i = np.arange(n, dtype=np.float32)
        return smoothstep(np.minimum(i, n - 1 - i) / m)

    return ramp(h)[:, None] * ramp(w)[None, :]


def _paint_cavity(
    img: Frame,
    U: F32,
    Vp: F32,
    p: F32,
    top: F32,
    bot: F32,
    rig: Rig,
    f: MouthFeature,
    teeth: bool,
) -> None:
    """Paint the opening into ``img`` (the mouth box of the warped region, in place)."""
    g = bot - top  # the opening's height at each pixel's column
    edge = 1.1  # px of soft edge
    depth_px = Vp - top  # px below the upper lip
    inside = np.minimum(depth_px, bot - Vp)  # px inside the opening, < 0 outside
    a = inside / edge + 0.5
    np.clip(a, 0.0, 1.0, out=a)
    # At the very corners, where the gap is thinner than a pixel, fade out.
    a *= np.clip(g / 1.5, 0.0, 1.0)
    # The lips' inner rims sit in the mouth's shadow.
    rim = np.clip(1.0 + inside / 2.5, 0.0, 1.0) * np.clip(g / 3.0, 0.0, 1.0)
    tau = np.clip(depth_px / np.maximum(g, _EPS), 0.0, 1.0)  # 0 top .. 1 bottom
    shade = 0.35 + 0.65 * p  # darker towards the corners

    # Dark red-brown interior, darkest in the shadow under the upper lip and teeth.
    light = 0.45 + 0.4 * tau
    col = np.array([74.0, 27.0, 24.0], np.float32) * (light * shade)[..., None]
    # The tongue: a duller pink whose surface arches up in the middle of a wide opening.
    surface = 0.95 - 0.3 * p
    tongue = smoothstep((tau - surface) / 0.25) * np.clip((g - 4.0) / 10.0, 0.0, 1.0) * smoothstep((p - 0.4) / 0.5)
    tongue_col = np.array([118.0, 52.0, 50.0], np.float32) * (0.55 + 0.45 * p)[..., None]
    col += (tongue_col - col) * (0.7 * tongue)[..., None]

    if teeth:
        col = _paint_teeth(col, U, depth_px, g, p, shade, rig, f)

    patch = img.astype(np.float32)
    patch *= (1.0 - 0.3 * rim)[..., None]
    patch += (col - patch) * a[..., None]
    img[...] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)


def _paint_teeth(
    col: F32,
    U: F32,
    depth_px: F32,
    g: F32,
    p: F32,
    shade: F32,
    rig: Rig,
    f: MouthFeature,
) -> F32:
    """Upper teeth hanging from the upper lip: a band at the top of the opening, a
    larger share of a small opening for a sibilant. Skipped when the avatar already
    shows its own teeth at rest (they move with the upper lip anyway)."""
    own = np.clip((rig.rest_gap / rig.mouth_width - 0.04) / 0.05, 0.0, 1.0)
    if own >= 1.0:
        return col
    share = 0.3 + 0.5 * f.teeth
    tooth_h = np.minimum(share * g, np.float32(0.11 * rig.mouth_width))
    # Incisors are about an eighth of the mouth wide: darker seams between them and a
    # slightly scalloped lower edge.
    period = np.float32(0.125 * rig.mouth_width)
    phase = np.abs(((U / period) % 1.0) - 0.5) * 2.0  # 1 at a seam, 0 mid-tooth
    seam = smoothstep((phase - 0.72) / 0.28)
    tip = tooth_h * (1.0 - 0.12 * seam)
    within = smoothstep((tip - depth_px) / 1.1 + 0.5)
    vis = np.clip((g - 1.0) / 2.5, 0.0, 1.0) * smoothstep((p - 0.12) / 0.45) * (1.0 - own)
    # Shaded from the upper lip's shadow at the top to lit at the biting edge.
    lit = 0.78 + 0.22 * np.clip(depth_px / np.maximum(tooth_h, 1.0), 0.0, 1.0)
    tone = (lit * (0.5 + 0.5 * shade) * (1.0 - 0.18 * seam))[..., None]
    tooth = np.array([226.0, 218.0, 204.0], np.float32) * tone
    return col + (tooth - col) * (within * vis)[..., None]
