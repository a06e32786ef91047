"""Speech in, mouth poses out: ``MouthFeatureStream`` turns 16 kHz float PCM into one
``MouthFeature`` per 40 ms frame.

Loudness (RMS in dB over a fixed speech range, so it works on a stream) shaped by the
spectrum: a high first-formant region (open vowels) opens the jaw most, high-band
dominated frames (sibilants, fricatives) keep it nearly shut but show teeth, a high
second formant spreads the lips ("ee") and a low one with a closed vowel rounds them
("oo"). A centred three-frame window needs exactly one frame of look-ahead.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from media.pcm import FloatPcm
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipeline.engines.base import FeatureStream

from .curves import smoothstep


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
    """One frame's pose before smoothing across frames."""

    open: float
    width: float
    teeth: float
    level: float


_SILENT = _Raw(0.0, 0.0, 0.0, 0.0)


def _unit(x: float, lo: float, hi: float) -> float:
    """Where ``x`` lies from ``lo`` (0) to ``hi`` (1), unclipped: smoothstep's input."""
    return (x - lo) / (hi - lo)


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

    def __call__(self, frame: npt.NDArray[np.float32]) -> _Raw:
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

        fricative = smoothstep(_unit(fric, cfg.fric_lo, cfg.fric_hi))
        vowel_open = smoothstep(_unit(f1, cfg.f1_closed_hz, cfg.f1_open_hz))
        loud = level**cfg.loud_gamma
        shape = cfg.closed_vowel_open + (1.0 - cfg.closed_vowel_open) * vowel_open
        shape *= 1.0 - (1.0 - cfg.fricative_open) * fricative
        voiced = 1.0 - fricative
        f2_mid = 0.5 * (cfg.f2_round_hz + cfg.f2_spread_hz)
        spread = smoothstep(_unit(f2, f2_mid, cfg.f2_spread_hz))
        # Only closed vowels round: an "ah" has a low second formant too.
        rounded = 1.0 - smoothstep(_unit(f2, cfg.f2_round_hz, f2_mid))
        rounded *= 1.0 - vowel_open
        gate = min(level * 2.0, 1.0) * voiced
        return _Raw(
            open=loud * shape,
            width=(spread - rounded) * gate,
            teeth=fricative * min(level * 2.0, 1.0),
            level=level,
        )


class MouthFeatureStream(FeatureStream[MouthFeature]):
    """One utterance: float PCM in any chunking, one ``MouthFeature`` per 640 samples out.

    Poses are causal and cheap, so they are computed as audio arrives and held until
    taken. Frame i is ready once frame i+1's audio has arrived (the centred smoothing
    window looks one frame ahead); ``finish`` zero-pads the last partial frame and treats
    the time after the utterance as silence.
    """

    def __init__(self, cfg: AnalysisConfig | None = None) -> None:
        self._analyze = _Analyzer(cfg or AnalysisConfig())
        self._cfg = self._analyze.cfg
        self._pending = np.zeros(0, np.float32)  # samples of the frame not yet complete
        self._prev = _SILENT  # raw pose of the frame before the next one to emit
        self._cur: _Raw | None = None  # raw pose of the next frame to emit
        self._open = 0.0  # follower state
        self._done = False
        self._ready: deque[MouthFeature] = deque()

    @property
    def finished(self) -> bool:
        return self._done

    def ready(self) -> int:
        return len(self._ready)

    def take(self, n: int) -> list[MouthFeature]:
        if n > len(self._ready):
            raise ValueError(f"{n} frames asked for, {len(self._ready)} ready")
        return [self._ready.popleft() for _ in range(n)]

    def push(self, pcm: FloatPcm) -> None:
        if self._done:
            raise RuntimeError("push() after finish(): start a new stream for the next utterance")
        samples = np.asarray(pcm)
        if samples.dtype.kind in "iu":
            # int16 taken as floats would be 32768 times too loud: a mouth stuck wide open.
            raise TypeError("push() takes float PCM in -1..1: convert int16 with media.pcm.to_float")
        samples = samples.astype(np.float32, copy=False).ravel()
        buf = np.concatenate([self._pending, samples]) if self._pending.size else samples
        n = buf.size // SAMPLES_PER_FRAME
        for i in range(n):
            self._add(self._analyze(buf[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME]))
        self._pending = buf[n * SAMPLES_PER_FRAME :].copy()

    def finish(self) -> None:
        if self._done:
            return
        if self._pending.size:
            frame = np.zeros(SAMPLES_PER_FRAME, np.float32)
            frame[: self._pending.size] = self._pending
            self._add(self._analyze(frame))
            self._pending = np.zeros(0, np.float32)
        if self._cur is not None:
            self._add(_SILENT, keep=False)
        self._done = True

    def _add(self, raw: _Raw, keep: bool = True) -> None:
        """``raw`` is the newest frame: the frame before it now has its look-ahead."""
        cur = self._cur
        if cur is not None:
            self._ready.append(self._emit(self._prev, cur, raw))
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
