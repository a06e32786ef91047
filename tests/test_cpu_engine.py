"""The CPU mouth engine: streaming features, and rendered frames whose mouth an
independent face-landmark detector sees open and close with the speech."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import lfilter

from avatars.avatar import Avatar, save_avatar
from avatars.default import ensure_default_avatar
from avatars.landmarks import CHIN, FACE_OVAL, NOSE_TIP, FaceMeshDetector
from media.pcm import to_float
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipeline.engines import RenderItem, create_engine
from pipeline.engines.base import whole_utterance
from pipeline.engines.cpu_mouth import CpuMouthEngine, MouthFeature
from pipeline.engines.cpu_mouth.rig import build_rig, smooth_landmarks
from tests.support.mouth import mouth_opening

MIN_CORRELATION = 0.6
MAX_LAG_FRAMES = 1
LAGS = range(-5, 6)

# (F1, F2, F3) in Hz
VOWELS = {"a": (750, 1200, 2500), "e": (500, 1900, 2600), "i": (300, 2300, 3000), "o": (500, 900, 2400), "u": (320, 850, 2300)}


# ---- audio ------------------------------------------------------------------------


def _resonate(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    c = 2 * r * np.cos(2 * np.pi * freq / SAMPLE_RATE)
    return lfilter([1 - r], [1, -c, r * r], x)


def _voiced(formants: tuple[float, float, float], seconds: float, f0: float = 120.0) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    phase = np.cumsum(np.full(n, f0 / SAMPLE_RATE) * np.linspace(1.05, 0.95, n))
    source = lfilter([1.0], [1, -0.95], np.diff(np.floor(phase), prepend=0.0))  # pulses, glottal tilt
    return sum(_resonate(source, f, bw) * g for f, bw, g in zip(formants, (90, 110, 150), (1.0, 0.6, 0.25), strict=True))


def _hiss(seconds: float, rng: np.random.Generator) -> np.ndarray:
    return _resonate(rng.standard_normal(int(seconds * SAMPLE_RATE)), 5500, 2000)


def _at_level(x: np.ndarray, rms_db: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (rms_db / 20)).astype(np.float32)


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Deterministic speech-like audio: phrases of 3-6 syllables (~4 per second), each an
    optional fricative or plosive onset and a formant-filtered voiced nucleus, with
    pauses between phrases."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    target = int(seconds * SAMPLE_RATE)
    while sum(p.size for p in parts) < target:
        for _ in range(int(rng.integers(3, 7))):
            onset = rng.random()
            if onset < 0.35:
                hiss = _hiss(rng.uniform(0.05, 0.09), rng)
                env = np.sin(np.linspace(0, np.pi, hiss.size)) ** 0.5
                parts.append(hiss / np.abs(hiss).max() * env * rng.uniform(0.04, 0.08))
            elif onset < 0.6:
                parts.append(np.zeros(int(0.03 * SAMPLE_RATE)))
                n = int(0.012 * SAMPLE_RATE)
                parts.append(rng.standard_normal(n) * np.linspace(1, 0, n) * 0.05)
            y = _voiced(VOWELS["aeiou"[int(rng.integers(0, 5))]], rng.uniform(0.11, 0.19), rng.uniform(105, 140))
            env = np.sin(np.linspace(0, np.pi, y.size)) ** 0.6
            parts.append(y / np.abs(y).max() * env * rng.uniform(0.35, 0.8))
            parts.append(np.zeros(int(rng.uniform(0.02, 0.06) * SAMPLE_RATE)))
        parts.append(np.zeros(int(rng.uniform(0.25, 0.45) * SAMPLE_RATE)))
    return np.concatenate(parts)[:target].astype(np.float32)


def tts_speech(text: str) -> np.ndarray:
    try:
        from tts.base import TTSError
        from tts.espeak import EspeakBackend
    except ImportError as exc:  # pragma: no cover - the offline backend ships with the project
        pytest.skip(f"no offline TTS: {exc}")

    async def synth() -> np.ndarray:
        backend = EspeakBackend()
        try:
            return to_float(np.concatenate([c async for c in backend.stream(text)]))
        finally:
            await backend.close()

    try:
        return asyncio.run(synth())
    except TTSError as exc:  # pragma: no cover - espeak missing on this machine
        pytest.skip(str(exc))


def frame_rms(pcm: np.ndarray, frames: int) -> np.ndarray:
    padded = np.zeros(frames * SAMPLES_PER_FRAME, np.float32)
    padded[: pcm.size] = pcm
    return np.sqrt(np.mean(padded.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))


def features_of(engine: CpuMouthEngine, pcm: np.ndarray) -> list[MouthFeature]:
    return whole_utterance(engine, pcm)


# ---- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def avatar(data_dir: Path) -> Avatar:
    """The default avatar: the astronaut portrait with idle motion (breathing, sway, blink)."""
    return ensure_default_avatar(data_dir)


@pytest.fixture(scope="module")
def engine(avatar: Avatar, data_dir: Path) -> CpuMouthEngine:
    eng = create_engine("cpu", data_dir)
    assert isinstance(eng, CpuMouthEngine)
    eng.prepare(avatar)
    return eng


def face_index(avatar: Avatar, k: int = 0) -> int:
    return [i for i in range(avatar.num_frames) if avatar.has_face(i)][k]


def render(engine: CpuMouthEngine, avatar: Avatar, features: list[MouthFeature], index: int | None = None) -> np.ndarray:
    """One output frame per feature, walking the idle loop like the worker (or holding
    ``index``), rendered in batches of ``max_batch``."""
    out = np.empty((len(features), *avatar.frame_shape), np.uint8)
    for start in range(0, len(features), engine.max_batch):
        chunk = range(start, min(start + engine.max_batch, len(features)))
        items = [
            RenderItem(avatar.name, avatar.idle_index(i) if index is None else index, features[i]) for i in chunk
        ]
        engine.render(items, [out[i] for i in chunk])
    return out


def measured_opening(frames: np.ndarray, video: bool = True) -> np.ndarray:
    with FaceMeshDetector(video=video) as det:
        return np.array([mouth_opening(det(f)) for f in frames])


def lagged_correlations(opening: np.ndarray, envelope: np.ndarray) -> dict[int, float]:
    """Pearson r of opening[t + lag] with envelope[t]; a positive lag: the mouth is late."""
    out = {}
    n = opening.size
    for lag in LAGS:
        a = opening[max(lag, 0) : n + min(lag, 0)]
        b = envelope[max(-lag, 0) : n - max(lag, 0)]
        ok = np.isfinite(a)
        out[lag] = float(np.corrcoef(a[ok], b[ok])[0, 1])
    return out


def assert_mouth_follows_speech(engine: CpuMouthEngine, avatar: Avatar, pcm: np.ndarray) -> None:
    features = features_of(engine, pcm)
    opening = measured_opening(render(engine, avatar, features))
    assert np.isfinite(opening).mean() > 0.95, "the detector lost the face in the rendered frames"
    corr = lagged_correlations(opening, frame_rms(pcm, len(features)))
    best = max(corr, key=corr.get)
    summary = ", ".join(f"{lag:+d}: {r:.2f}" for lag, r in corr.items())
    assert corr[best] >= MIN_CORRELATION, f"opening vs speech envelope by lag: {summary}"
    assert abs(best) <= MAX_LAG_FRAMES, f"mouth is {best} frames off the audio: {summary}"


# ---- the bar: the output mouth follows the speech ------------------------------------


def test_mouth_opening_follows_tts_speech_envelope(engine: CpuMouthEngine, avatar: Avatar) -> None:
    pcm = tts_speech("Hello there! I am a talking avatar, and I speak clearly.")[: int(3.6 * SAMPLE_RATE)]
    assert_mouth_follows_speech(engine, avatar, pcm)


def test_mouth_opening_follows_synthetic_speech_envelope(engine: CpuMouthEngine, avatar: Avatar) -> None:
    assert_mouth_follows_speech(engine, avatar, synthetic_speech(4.0, seed=3))


# ---- features ---------------------------------------------------------------------


def test_features_do_not_depend_on_how_the_audio_is_chunked(engine: CpuMouthEngine) -> None:
    pcm = synthetic_speech(2.0, seed=1)
    whole = features_of(engine, pcm)
    rng = np.random.default_rng(7)
    stream = engine.new_stream()
    at = 0
    while at < pcm.size:
        step = int(rng.integers(1, 2000))
        stream.push(pcm[at : at + step])
        at += step
    stream.finish()
    assert stream.take(stream.ready()) == whole


@pytest.mark.parametrize("samples", [0, 1, 639, 640, 641, 12 * SAMPLES_PER_FRAME + 100])
def test_flush_leaves_no_sample_without_a_frame(engine: CpuMouthEngine, samples: int) -> None:
    pcm = synthetic_speech(1.0, seed=2)[:samples]
    assert len(features_of(engine, pcm)) == -(-samples // SAMPLES_PER_FRAME)


def test_a_frame_is_released_once_the_next_frames_audio_arrives(engine: CpuMouthEngine) -> None:
    pcm = synthetic_speech(1.0, seed=4)
    stream = engine.new_stream()
    stream.push(pcm[:SAMPLES_PER_FRAME])
    assert stream.ready() == 0  # frame 0 waits for frame 1
    stream.push(pcm[SAMPLES_PER_FRAME : 2 * SAMPLES_PER_FRAME - 1])
    assert stream.ready() == 0
    stream.push(pcm[2 * SAMPLES_PER_FRAME - 1 : 2 * SAMPLES_PER_FRAME])
    assert stream.ready() == 1
    stream.finish()
    assert stream.ready() == 2 and len(stream.take(2)) == 2


def test_loud_vowel_opens_wider_than_a_sibilant_at_equal_loudness(engine: CpuMouthEngine, avatar: Avatar) -> None:
    vowel = _at_level(_voiced(VOWELS["a"], 0.6), -20.0)
    sibilant = _at_level(_hiss(0.6, np.random.default_rng(0)), -20.0)
    fv = features_of(engine, vowel)[4:-4]
    fs = features_of(engine, sibilant)[4:-4]
    assert min(f.open for f in fv) > 2 * max(f.open for f in fs)
    assert np.mean([f.teeth for f in fs]) > np.mean([f.teeth for f in fv]) + 0.5
    # ...and the detector sees it on the rendered frames.
    index = face_index(avatar)
    frames = render(engine, avatar, [fv[len(fv) // 2], fs[len(fs) // 2]], index=index)
    open_vowel, open_sibilant = measured_opening(frames, video=False)
    assert open_vowel > open_sibilant + 0.03


def test_front_vowel_spreads_the_lips_and_back_vowel_rounds_them(engine: CpuMouthEngine) -> None:
    ee = features_of(engine, _at_level(_voiced(VOWELS["i"], 0.5), -20.0))[3:-3]
    oo = features_of(engine, _at_level(_voiced(VOWELS["u"], 0.5), -20.0))[3:-3]
    assert np.mean([f.width for f in ee]) > 0.5
    assert np.mean([f.width for f in oo]) < -0.5


# ---- rendering --------------------------------------------------------------------


def test_silence_keeps_the_mouth_at_rest(engine: CpuMouthEngine, avatar: Avatar) -> None:
    features = features_of(engine, np.zeros(SAMPLES_PER_FRAME * 6, np.float32))
    assert all(f.open == 0.0 and f.width == 0.0 for f in features)
    index = face_index(avatar)
    frames = render(engine, avatar, features[:2], index=index)
    assert np.array_equal(frames[0], avatar.frames[index])
    rest = mouth_opening(avatar.landmarks[index])
    assert abs(measured_opening(frames, video=False)[0] - rest) < 0.03


def test_rendered_opening_grows_with_the_feature(engine: CpuMouthEngine, avatar: Avatar) -> None:
    poses = [MouthFeature(o, 0.0, 0.0) for o in (0.0, 0.5, 1.0)]
    closed, half, wide = measured_opening(render(engine, avatar, poses, index=face_index(avatar)), video=False)
    assert closed + 0.04 < half < wide - 0.02


def test_render_changes_only_the_lower_face(engine: CpuMouthEngine, avatar: Avatar) -> None:
    index = face_index(avatar)
    lm = avatar.landmarks[index]
    (frame,) = render(engine, avatar, [MouthFeature(1.0, 1.0, 1.0)], index=index)
    changed = np.any(frame != avatar.frames[index], axis=2)
    ys, xs = np.nonzero(changed)
    assert ys.size > 0, "a wide-open mouth changed nothing"
    oval = lm[FACE_OVAL]
    face_w = oval[:, 0].max() - oval[:, 0].min()
    face_h = lm[CHIN, 1] - oval[:, 1].min()
    assert ys.min() >= lm[NOSE_TIP, 1]  # nothing above the nose tip
    assert ys.max() <= lm[CHIN, 1] + 0.5 * face_h  # nor far below the chin
    assert xs.min() >= oval[:, 0].min() - 0.1 * face_w  # nor beside the face
    assert xs.max() <= oval[:, 0].max() + 0.1 * face_w
    # ...and all of it inside the box the rig declares as the region it may change
    opts = engine.options
    smoothed = smooth_landmarks(np.asarray(avatar.landmarks, np.float64), engine.smooth_landmarks)
    rig = build_rig(smoothed[index], avatar.width, avatar.height, opts.max_open, opts.upper_lip, opts.spread)
    assert rig is not None
    x0, y0, x1, y1 = rig.box
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def test_frame_without_a_face_is_copied_as_is(data_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    landmarks = np.full((2, 478, 2), np.nan, np.float32)
    faceless = save_avatar(tmp_path, "faceless", frames, landmarks)
    eng = create_engine("cpu", data_dir)
    eng.prepare(faceless)
    out = np.zeros((2, 64, 80, 3), np.uint8)
    eng.render([RenderItem("faceless", i, MouthFeature(1.0, 1.0, 1.0)) for i in range(2)], list(out))
    assert np.array_equal(out, np.asarray(faceless.frames))  # the stored frames (JPEG), untouched
