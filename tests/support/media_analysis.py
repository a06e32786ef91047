"""Analysis of what a client received: speech envelope, mouth opening, speech spans.

Audio and video are lined up by their RTP timestamps (the server numbers both from the
same origin), so these measures do not depend on arrival jitter.
"""
from __future__ import annotations

import numpy as np

from avatars.landmarks import FaceMeshDetector
from media.timing import FRAME_S, SAMPLE_RATE, VIDEO_TICKS_PER_FRAME
from tests.support.client import Received
from tests.support.mouth import mouth_opening


def audio_track(received: Received) -> tuple[np.ndarray, int]:
    """All received audio as one mono array placed by pts (gaps zero-filled)."""
    if not received.audio:
        return np.zeros(0, np.float32), 48_000
    rate = received.audio[0].rate
    end = max(a.pts + a.samples.size for a in received.audio)
    out = np.zeros(end, np.float32)
    for a in received.audio:
        out[a.pts : a.pts + a.samples.size] = a.samples
    return out, rate


def envelope(received: Received) -> np.ndarray:
    """RMS per 40 ms media frame, indexed like video frames (pts / 3600)."""
    pcm, rate = audio_track(received)
    hop = int(rate * FRAME_S)
    n = pcm.size // hop
    return np.sqrt(np.mean(pcm[: n * hop].reshape(n, hop) ** 2, axis=1)) if n else np.zeros(0)


def video_index(pts: int) -> int:
    """The media frame index a video RTP timestamp (90 kHz, from the stream's origin) shows."""
    return round(pts / VIDEO_TICKS_PER_FRAME)


def mouth_series(received: Received, start: int = 0, stop: int | None = None) -> dict[int, float]:
    """Mouth opening per video frame index, measured by an independent face-mesh detector."""
    out: dict[int, float] = {}
    with FaceMeshDetector(video=False) as det:
        for v in received.video:
            i = video_index(v.pts)
            if v.image is None or i < start or (stop is not None and i >= stop):
                continue
            out[i] = mouth_opening(det(v.image))
    return out


def best_lag_correlation(mouth: dict[int, float], env: np.ndarray, max_lag: int = 5) -> tuple[float, int]:
    """Pearson correlation of mouth opening with the envelope, at the best lag (frames;
    positive = video later than audio)."""
    best = (-2.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        pairs = [(m, env[i - lag]) for i, m in mouth.items() if 0 <= i - lag < env.size and np.isfinite(m)]
        if len(pairs) < 10:
            continue
        a, b = np.array(pairs).T
        if a.std() == 0 or b.std() == 0:
            continue
        r = float(np.corrcoef(a, b)[0, 1])
        if r > best[0]:
            best = (r, lag)
    return best


def speech_span(env: np.ndarray, threshold: float = 0.01) -> tuple[int, int] | None:
    """First and last 40 ms frame index whose RMS is above ``threshold``."""
    idx = np.flatnonzero(env > threshold)
    return (int(idx[0]), int(idx[-1])) if idx.size else None


def wav_bytes(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(pcm * 32767, -32768, 32767).astype(np.int16).tobytes())
    return buf.getvalue()
