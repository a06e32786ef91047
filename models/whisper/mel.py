"""Whisper's log-mel spectrogram, computable a piece at a time.

The time grid: a mel frame every 10 ms (``HOP_LENGTH`` samples, 25 ms ``N_FFT``
windows), an encoder step every two frames (20 ms: the encoder's second convolution has
stride 2), and Whisper's context of 30 s (1500 steps) that the reference pads every
segment of audio to.

``LogMel`` computes frames exactly as openai-whisper's ``log_mel_spectrogram`` does for
the zero-padded 30 s segment (Slaney mel filters, Hann-windowed STFT, log10 of the power),
but for any range of frames: ``padded_signal`` hands it the samples ``torch.stft(center=True)``
would see there (reflection at the segment's edges, zeros after the audio), so frames
computed piecewise as audio streams in equal those of one pass over the segment.
``normalise_log_mel`` is Whisper's dynamic-range clamp ``max(x, M - 8)`` and scaling; the
streaming encoder chooses ``M``.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from media.timing import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160  # one mel frame: 10 ms
STEP_SAMPLES = 2 * HOP_LENGTH  # one encoder step: 20 ms
SEGMENT_STEPS = 1500  # Whisper's 30 s context
SEGMENT_FRAMES = 2 * SEGMENT_STEPS
SEGMENT_SAMPLES = SEGMENT_FRAMES * HOP_LENGTH


def _hz_to_mel(f: npt.ArrayLike) -> npt.NDArray[np.float64]:  # Slaney's scale, as librosa's default
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    mels = f / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: npt.ArrayLike) -> npt.NDArray[np.float64]:
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> npt.NDArray[np.float32]:
    """Slaney-normalised triangular mel filters: ``librosa.filters.mel(sr, n_fft, n_mels)``,
    the bank openai-whisper ships as ``mel_filters.npz``."""
    fftfreqs = np.linspace(0.0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


class LogMel:
    """log10 mel power frames of a padded signal chunk (no normalisation)."""

    def __init__(self, n_mels: int, device: torch.device) -> None:
        self.filters = torch.from_numpy(mel_filters(n_mels)).to(device)
        self.window = torch.hann_window(N_FFT, device=device)
        self.device = device

    def __call__(self, padded: npt.NDArray[np.float32]) -> torch.Tensor:
        """``padded`` = signal positions [160 f0 - 200, 160 f1 + 40) -> frames f0..f1 (n_mels, f1 - f0)."""
        x = torch.from_numpy(np.ascontiguousarray(padded, np.float32)).to(self.device)
        spec = torch.stft(x, N_FFT, HOP_LENGTH, window=self.window, center=False, return_complex=True)
        power = spec.abs() ** 2
        return torch.clamp(self.filters @ power, min=1e-10).log10()


def normalise_log_mel(log_spec: torch.Tensor, maximum: torch.Tensor | float) -> torch.Tensor:
    """Whisper's dynamic-range clamp and scaling."""
    return (torch.maximum(log_spec, torch.as_tensor(maximum, device=log_spec.device) - 8.0) + 4.0) / 4.0


def padded_signal(segment: npt.NDArray[np.float32], known: int, final: bool, a: int, b: int) -> npt.NDArray[np.float32]:
    """Samples of a 30 s segment at positions [a, b) as ``torch.stft(center=True)`` sees
    the zero-padded segment: reflected about its first and last sample, zeros after the
    audio (only once it is known to have ended)."""
    pos = np.arange(a, b)
    pos = np.where(pos < 0, -pos, pos)
    pos = np.where(pos >= SEGMENT_SAMPLES, 2 * (SEGMENT_SAMPLES - 1) - pos, pos)
    if not final and pos.max(initial=-1) >= known:
        raise AssertionError("mel frame asked for before its audio arrived")
    out = np.zeros(b - a, np.float32)
    inside = pos < known
    out[inside] = segment[pos[inside]]
    return out
