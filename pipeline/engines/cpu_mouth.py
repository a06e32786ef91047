"""The CPU engine: moves the jaw and lips of the avatar's own frame, driven by the speech.

No weights, no torch. Two halves:

* ``MouthFeatureStream`` turns 16 kHz PCM into one ``MouthFeature`` per 40 ms frame:
  loudness (RMS in dB over a fixed speech range, so it works on a stream) shaped by the
  spectrum: a high first-formant region (open vowels) opens the jaw most, high-band
  dominated frames (sibilants, fricatives) keep it nearly shut but show teeth, a high
  second formant spreads the lips ("ee") and a low one with a closed vowel rounds them
  ("oo"). A centred three-frame window needs exactly one frame of look-ahead.
* ``CpuMouthEngine.render`` warps only the lower face with one ``cv2.remap``: the lower
  lip and chin drop with the jaw (fading out at the face oval, under the chin and
  towards the nose), the upper lip lifts a little, the corners move in or out, and the
  mouth cavity (dark interior, a hint of upper teeth, a tongue shade) is painted into
  the gap between the lips, because stretching closed lips alone shows no opening.
  Everything that does not depend on the audio is worked out once in ``prepare``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatars.avatar import Avatar
from avatars.landmarks import FACE_OVAL, LOWER_INNER_LIP, UPPER_INNER_LIP
from pipeline.engines.base import FeatureStream, LipSyncEngine, RenderItem
from pipeline.messages import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)

# Inner-lip contours from corner to corner, upper and lower paired point by point
# (the mesh is symmetric, so the i-th upper point sits above the i-th lower one).
_INNER_UPPER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
_INNER_LOWER = [78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308]
_OUTER_LEFT, _OUTER_RIGHT = 61, 291
_OUTER_LOWER = 17
_SUBNASALE = 2

_EPS = 1e-6


# ---- features ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MouthFeature:
    """The mouth pose for one 40 ms frame."""

    open: float  # jaw opening, 0 closed .. 1 widest speech opening
    width: float  # lip corners, -1 rounded ("oo") .. +1 spread ("ee")
    teeth: float  # 0..1 how much upper teeth show through the opening (sibilants)
    level: float = 0.0  # 0..1 loudness of the frame, for diagnostics


@dataclass(frozen=True)
class AnalysisConfig:
    """How audio maps to mouth poses. The dB range is fixed (not adapted to the
    utterance) so a frame's pose is known as soon as its look-ahead has arrived."""

    floor_db: float = -48.0  # at or below: silence, mouth shut
    ceil_db: float = -16.0  # at or above: full loudness
    loud_gamma: float = 2.0  # >1 keeps quiet consonants and breath near closed
    # Jaw opening for a loud frame: a closed vowel ("ee", "oo") opens this much, an open
    # one ("ah") fully; judged from the power centroid of 200-1000 Hz (first formant).
    closed_vowel_open: float = 0.7
    f1_closed_hz: float = 320.0
    f1_open_hz: float = 650.0
    # Share of power above 3 kHz: at fric_hi a frame is a pure fricative.
    fric_lo: float = 0.15
    fric_hi: float = 0.6
    fricative_open: float = 0.22  # jaw opening for a pure fricative, relative to a vowel
    # Second formant region (power centroid of 1-3 kHz): spread above, rounded below.
    f2_round_hz: float = 1450.0
    f2_spread_hz: float = 2150.0
    # Smoothing: a centred [1 2 1]/4 window (one frame of look-ahead), then a one-pole
    # follower that opens fast and closes a little slower, so the mouth neither
    # flickers nor hangs open between syllables.
    attack: float = 1.0
    release: float = 0.75


@dataclass(frozen=True, slots=True)
class _Raw:
    open: float
    width: float
    teeth: float
    level: float


_SILENT = _Raw(0.0, 0.0, 0.0, 0.0)


def _smoothstep(x: float, lo: float, hi: float) -> float:
    t = min(max((x - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Analyzer:
    """Per-frame audio analysis; pure function of the frame's 640 samples."""

    NFFT = 1024

    def __init__(self, cfg: AnalysisConfig) -> None:
        self.cfg = cfg
        self.window = np.hanning(SAMPLES_PER_FRAME).astype(np.float64)
        freqs = np.fft.rfftfreq(self.NFFT, 1.0 / SAMPLE_RATE)
        self.freqs = freqs
        self.all_band = (freqs >= 80) & (freqs < 8000)
        self.high_band = (freqs >= 3000) & (freqs < 8000)
        self.f1_band = (freqs >= 200) & (freqs < 1000)
        self.f2_band = (freqs >= 1000) & (freqs < 3000)

    def __call__(self, frame: np.ndarray) -> _Raw:
        cfg = self.cfg
        x = frame.astype(np.float64)
        rms = math.sqrt(float(np.dot(x, x)) / x.size)
        db = 20.0 * math.log10(rms + 1e-9)
        level = min(max((db - cfg.floor_db) / (cfg.ceil_db - cfg.floor_db), 0.0), 1.0)
        if level <= 0.0:
            return _SILENT
        power = np.abs(np.fft.rfft(x * self.window, self.NFFT)) ** 2
        total = float(power[self.all_band].sum()) + 1e-12
        fric = float(power[self.high_band].sum()) / total
        p1 = power[self.f1_band]
        f1 = float(np.dot(p1, self.freqs[self.f1_band]) / (p1.sum() + 1e-12))
        p2 = power[self.f2_band]
        f2 = float(np.dot(p2, self.freqs[self.f2_band]) / (p2.sum() + 1e-12))

        fricative = _smoothstep(fric, cfg.fric_lo, cfg.fric_hi)
        vowel_open = _smoothstep(f1, cfg.f1_closed_hz, cfg.f1_open_hz)
        loud = level**cfg.loud_gamma
        shape = cfg.closed_vowel_open + (1.0 - cfg.closed_vowel_open) * vowel_open
        shape *= 1.0 - (1.0 - cfg.fricative_open) * fricative
        voiced = 1.0 - fricative
        spread = _smoothstep(f2, 0.5 * (cfg.f2_round_hz + cfg.f2_spread_hz), cfg.f2_spread_hz)
        # Only closed vowels round: an "ah" has a low second formant too.
        rounded = (1.0 - _smoothstep(f2, cfg.f2_round_hz, 0.5 * (cfg.f2_round_hz + cfg.f2_spread_hz)))
        rounded *= 1.0 - vowel_open
        gate = min(level * 2.0, 1.0) * voiced
        return _Raw(
            open=loud * shape,
            width=(spread - rounded) * gate,
            teeth=fricative * min(level * 2.0, 1.0),
            level=level,
        )


class MouthFeatureStream(FeatureStream):
    """One utterance: PCM in any chunking, one ``MouthFeature`` per 640 samples out.

    Frame i is emitted once frame i+1's audio has arrived (the centred smoothing window
    looks one frame ahead); ``flush`` zero-pads the last partial frame and treats the
    time after the utterance as silence.
    """

    def __init__(self, cfg: AnalysisConfig | None = None) -> None:
        self._analyze = _Analyzer(cfg or AnalysisConfig())
        self._cfg = self._analyze.cfg
        self._pending = np.zeros(0, np.float32)  # samples of the frame not yet complete
        self._prev = _SILENT  # raw pose of the frame before the next one to emit
        self._cur: _Raw | None = None  # raw pose of the next frame to emit
        self._open = 0.0  # follower state
        self._done = False

    def push(self, pcm: np.ndarray) -> list[MouthFeature]:
        if self._done:
            raise RuntimeError("push() after flush(): start a new stream for the next utterance")
        pcm = np.asarray(pcm)
        if pcm.dtype == np.int16:
            pcm = pcm.astype(np.float32) / 32768.0
        pcm = pcm.astype(np.float32, copy=False).ravel()
        buf = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        out: list[MouthFeature] = []
        n = buf.size // SAMPLES_PER_FRAME
        for i in range(n):
            self._add(self._analyze(buf[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME]), out)
        self._pending = buf[n * SAMPLES_PER_FRAME :].copy()
        return out

    def flush(self) -> list[MouthFeature]:
        if self._done:
            return []
        out: list[MouthFeature] = []
        if self._pending.size:
            frame = np.zeros(SAMPLES_PER_FRAME, np.float32)
            frame[: self._pending.size] = self._pending
            self._add(self._analyze(frame), out)
            self._pending = np.zeros(0, np.float32)
        if self._cur is not None:
            self._add(_SILENT, out, keep=False)
        self._done = True
        return out

    def _add(self, raw: _Raw, out: list[MouthFeature], keep: bool = True) -> None:
        """``raw`` is the newest frame: the frame before it now has its look-ahead."""
        cur = self._cur
        if cur is not None:
            out.append(self._emit(self._prev, cur, raw))
            self._prev = cur
        self._cur = raw if keep else None

    def _emit(self, prev: _Raw, cur: _Raw, nxt: _Raw) -> MouthFeature:
        cfg = self._cfg
        target = 0.25 * prev.open + 0.5 * cur.open + 0.25 * nxt.open
        rate = cfg.attack if target > self._open else cfg.release
        self._open += rate * (target - self._open)
        width = 0.25 * prev.width + 0.5 * cur.width + 0.25 * nxt.width
        teeth = 0.25 * prev.teeth + 0.5 * cur.teeth + 0.25 * nxt.teeth
        return MouthFeature(
            open=float(min(max(self._open, 0.0), 1.0)),
            width=float(min(max(width, -1.0), 1.0)),
            teeth=float(min(max(teeth, 0.0), 1.0)),
            level=cur.level,
        )


# ---- geometry ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Rig:
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
    lower_poly: np.ndarray  # lower inner lip v(u), quartic, valid over [u_lo, u_hi]
    rest_gap: float  # inner-lip gap at rest, mid-mouth
    u_lo: float
    u_hi: float
    inner_half: tuple[float, float]  # inner-lip half widths, left and right
    outer_half: tuple[float, float]  # outer-lip half widths (corner to centre)
    face_half: tuple[float, float]  # face-oval half widths at mouth height
    chin_poly: np.ndarray  # jaw line v'(u), quartic over the lower face oval
    chin_lo: float
    chin_hi: float
    nose: float  # distance from the lower inner lip up to the nose base
    nose_v: float  # v of the nose base
    chin: float  # distance from the lower inner lip down to the chin
    lip: float  # lower-lip thickness
    mouth_width: float  # outer corner to corner


@dataclass(frozen=True)
class _Prepared:
    frames: np.ndarray
    rigs: list[_Rig | None]
    xs: np.ndarray  # 0..W-1 as float32
    ys: np.ndarray  # 0..H-1 as float32


def _smooth_landmarks(lm: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian smoothing over time, across frames that have a face only, so the painted
    mouth does not jitter with the detector from one avatar frame to the next."""
    n = lm.shape[0]
    if n < 3 or sigma <= 0:
        return lm.copy()
    radius = int(math.ceil(2 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    valid = np.isfinite(lm[:, 0, 0])
    out = lm.copy()
    filled = np.where(valid[:, None, None], lm, 0.0)
    for i in np.flatnonzero(valid):
        lo, hi = max(0, i - radius), min(n, i + radius + 1)
        w = kernel[lo - i + radius : hi - i + radius] * valid[lo:hi]
        out[i] = np.tensordot(w, filled[lo:hi], axes=1) / w.sum()
    return out


def _build_rig(
    lm: np.ndarray, width: int, height: int, max_open: float, max_lift: float, max_spread: float
) -> _Rig | None:
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

    def local(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    def side_width(mask: np.ndarray) -> float:
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
    # Below the chin the drop fades out over 0.6 chin (see _warp), after a drop of <= jaw.
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
    return _Rig(
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


def _sstep(x: np.ndarray) -> np.ndarray:
    """Smoothstep of an array already scaled to 0..1 (clipped here, in place: pass a
    temporary)."""
    np.clip(x, 0.0, 1.0, out=x)
    return x * x * (3.0 - 2.0 * x)


def _polyval(coeffs: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        out *= x
        out += c
    return out


# ---- engine -----------------------------------------------------------------------


class CpuMouthEngine(LipSyncEngine):
    """Warps the lower face of the avatar's own frames; needs no weights.

    Options (constructor keywords):

    * ``max_open``: the jaw drop at full opening, as a fraction of the mouth width.
    * ``upper_lip``: how far the upper lip lifts, as a fraction of the jaw drop.
    * ``spread`` / ``pucker``: how far the corners move out for "ee" / in for "oo", as a
      fraction of half the mouth width.
    * ``teeth``: draw the hint of upper teeth in the opening.
    """

    name = "cpu"
    max_batch = 8

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        max_open: float = 0.3,
        upper_lip: float = 0.2,
        spread: float = 0.12,
        pucker: float = 0.3,
        teeth: bool = True,
        smooth_landmarks: float = 1.0,
        analysis: AnalysisConfig | None = None,
        **ignored: Any,
    ) -> None:
        if ignored:
            # "auto" hands the same options to whichever engine it ends up with.
            log.info("cpu engine ignores options %s", ", ".join(sorted(ignored)))
        if not 0.0 < max_open <= 1.5:
            raise ValueError(f"max_open must be in (0, 1.5], got {max_open}")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.max_open = float(max_open)
        self.upper_lip = float(upper_lip)
        self.spread = float(spread)
        self.pucker = float(pucker)
        self.teeth = bool(teeth)
        self.smooth_landmarks = float(smooth_landmarks)
        self.analysis = analysis or AnalysisConfig()
        self._avatars: dict[str, _Prepared] = {}

    # ---- interface ----
    def prepare(self, avatar: Avatar) -> None:
        lm = _smooth_landmarks(np.asarray(avatar.landmarks, np.float64), self.smooth_landmarks)
        rigs = [
            _build_rig(lm[i], avatar.width, avatar.height, self.max_open, self.upper_lip, self.spread)
            for i in range(avatar.num_frames)
        ]
        faces = sum(r is not None for r in rigs)
        if faces == 0:
            log.warning("avatar %s has no usable face: the cpu engine will show it unchanged", avatar.name)
        self._avatars[avatar.name] = _Prepared(
            frames=avatar.frames,
            rigs=rigs,
            xs=np.arange(avatar.width, dtype=np.float32),
            ys=np.arange(avatar.height, dtype=np.float32),
        )

    def new_stream(self) -> MouthFeatureStream:
        return MouthFeatureStream(self.analysis)

    def render(self, items: Sequence[RenderItem], outs: Sequence[np.ndarray]) -> None:
        for item, out in zip(items, outs):
            prep = self._avatars.get(item.avatar)
            if prep is None:
                raise KeyError(f"avatar {item.avatar!r} was not prepared")
            frame = prep.frames[item.avatar_index]
            np.copyto(out, frame)
            rig = prep.rigs[item.avatar_index]
            feature = item.feature
            if rig is None or not isinstance(feature, MouthFeature):
                continue
            if feature.open < 1e-3 and abs(feature.width) < 1e-3:
                continue  # the rest pose is the frame itself
            self._warp(frame, out, rig, prep, feature)

    def region(self, avatar: str, index: int) -> tuple[int, int, int, int] | None:
        """The box (x0, y0, x1, y1) that rendering may change in frame ``index``."""
        rig = self._avatars[avatar].rigs[index]
        return None if rig is None else rig.box

    # ---- drawing ----
    def _warp(self, frame: np.ndarray, out: np.ndarray, rig: _Rig, prep: _Prepared, f: MouthFeature) -> None:
        x0, y0, x1, y1 = rig.box
        ox, oy = rig.origin
        eux, euy = rig.eu
        evx, evy = rig.ev
        dx = prep.xs[x0:x1] - np.float32(ox)
        dy = prep.ys[y0:y1, None] - np.float32(oy)
        U = dx * np.float32(eux) + dy * np.float32(euy)
        V = dx * np.float32(evx) + dy * np.float32(evy)
        Vp = V - _polyval(rig.lower_poly, np.clip(U, rig.u_lo, rig.u_hi))

        jaw = float(f.open) * self.max_open * rig.mouth_width  # px
        width = float(np.clip(f.width - 0.3 * f.open, -1.0, 1.0))
        k = self.spread if width > 0 else self.pucker
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
        top = (-self.upper_lip * jaw) * p
        bot = jaw * p

        # Jaw side: lips to chin move down, the chin a little less far than the lower
        # lip's middle; fades out at the face oval and below the chin.
        face = np.where(right, np.float32(rig.face_half[1]), np.float32(rig.face_half[0]))
        aU = np.abs(U)
        pc = 1.0 - _sstep((aU - 0.35 * face) / (0.6 * face))
        t = np.clip((Vp - bot) / np.float32(rig.chin * 0.9), 0.0, 1.0)
        prof = p + (0.9 * pc - p) * t
        chin_v = _polyval(rig.chin_poly, np.clip(U, rig.chin_lo, rig.chin_hi))
        fade = 1.0 - _sstep((Vp - chin_v - jaw * 0.9 * pc) / np.float32(0.6 * rig.chin))
        dv_low = jaw * prof * fade
        # Lip side: the upper lip lifts, fading out towards the nose. Beside the mouth v'
        # follows the raised corners, so also fade by plain height: nothing at or above
        # the nose base moves.
        half = 0.5 * rig.rest_gap
        up = max(rig.nose - half, 2.0)
        below_nose = _sstep((V - np.float32(rig.nose_v)) / np.float32(0.35 * up))
        dv_up = top * _sstep(1.0 + (Vp - top) / np.maximum(top + np.float32(rig.nose), 1.0)) * below_nose
        dv = np.where(Vp >= bot, dv_low, np.where(Vp <= top, dv_up, Vp))

        # Corners in or out, dragging the cheeks, fading out to the face oval.
        au = aU / outer
        hx = np.where(au <= 1.0, au, 1.0 - _sstep((aU - outer) / (face - outer)))
        # ...over a band covering both lips, fading out at the nose base and towards the
        # chin (v' is measured from the lower inner lip; vc from mid-mouth).
        vc = Vp + np.float32(half)
        band = min(rig.lip * 1.3, 0.5 * up)
        gy_up = 1.0 - _sstep((-vc - band) / np.float32(up - band))
        gy_down = 1.0 - _sstep((vc - band) / np.float32(max(0.8 * rig.chin - band, 1.0)))
        gy = np.where(vc < 0, gy_up * below_nose, gy_down)
        du = np.sign(U) * hx * gy * np.where(right, np.float32(corner[1]), np.float32(corner[0]))

        # Zero motion at the edges of the box, so the region drops back in seamlessly.
        window = self._edge_window(*dv.shape)
        du *= window
        dv *= window

        map_x = (dx + np.float32(ox)) - du * np.float32(eux) - dv * np.float32(evx)
        map_y = (dy + np.float32(oy)) - du * np.float32(euy) - dv * np.float32(evy)
        warped = cv2.remap(
            np.asarray(frame), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        if jaw > 0.5:
            mx0, my0, mx1, my1 = rig.mouth
            m = (slice(my0, my1), slice(mx0, mx1))
            self._paint_cavity(warped[m], U[m], Vp[m], p[m], top[m], bot[m], rig, f)
        out[y0:y1, x0:x1] = warped

    @staticmethod
    def _edge_window(h: int, w: int) -> np.ndarray:
        def ramp(n: int) -> np.ndarray:
            m = max(2, n // 12)
            i = np.arange(n, dtype=np.float32)
            r = np.clip(np.minimum(i, n - 1 - i) / m, 0.0, 1.0)
            return r * r * (3.0 - 2.0 * r)

        return ramp(h)[:, None] * ramp(w)[None, :]

    def _paint_cavity(
        self,
        img: np.ndarray,
        U: np.ndarray,
        Vp: np.ndarray,
        p: np.ndarray,
        top: np.ndarray,
        bot: np.ndarray,
        rig: _Rig,
        f: MouthFeature,
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
        tongue = _sstep((tau - surface) / 0.25) * np.clip((g - 4.0) / 10.0, 0.0, 1.0) * _sstep((p - 0.4) / 0.5)
        tongue_col = np.array([118.0, 52.0, 50.0], np.float32) * (0.55 + 0.45 * p)[..., None]
        col += (tongue_col - col) * (0.7 * tongue)[..., None]

        if self.teeth:
            col = self._paint_teeth(col, U, depth_px, g, p, shade, rig, f)

        patch = img.astype(np.float32)
        patch *= (1.0 - 0.3 * rim)[..., None]
        patch += (col - patch) * a[..., None]
        img[...] = np.clip(patch + 0.5, 0, 255).astype(np.uint8)

    @staticmethod
    def _paint_teeth(
        col: np.ndarray,
        U: np.ndarray,
        depth_px: np.ndarray,
        g: np.ndarray,
        p: np.ndarray,
        shade: np.ndarray,
        rig: _Rig,
        f: MouthFeature,
    ) -> np.ndarray:
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
        seam = _sstep((phase - 0.72) / 0.28)
        tip = tooth_h * (1.0 - 0.12 * seam)
        within = _sstep((tip - depth_px) / 1.1 + 0.5)
        vis = np.clip((g - 1.0) / 2.5, 0.0, 1.0) * _sstep((p - 0.12) / 0.45) * (1.0 - own)
        # Shaded from the upper lip's shadow at the top to lit at the biting edge.
        lit = 0.78 + 0.22 * np.clip(depth_px / np.maximum(tooth_h, 1.0), 0.0, 1.0)
        tone = (lit * (0.5 + 0.5 * shade) * (1.0 - 0.18 * seam))[..., None]
        tooth = np.array([226.0, 218.0, 204.0], np.float32) * tone
        return col + (tooth - col) * (within * vis)[..., None]
