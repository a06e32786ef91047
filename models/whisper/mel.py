"""Whisper's log-mel spectrogram and its time grid.

A mel frame every 10 ms (``HOP_LENGTH`` samples, 25 ms ``N_FFT`` windows), an encoder
step every two frames (20 ms: the encoder's second convolution has stride 2), and
Whisper's context of 30 s (1500 steps) that the reference pads every segment of audio to.
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


class LogMelSpectrogram:
    """Whisper's log10 mel power spectrogram (Slaney filters, Hann STFT centred with
    reflection, the last frame dropped, as both openai-whisper's ``log_mel_spectrogram``
    and Hugging Face's ``WhisperFeatureExtractor`` compute it), not yet normalised."""

    def __init__(self, n_mels: int, device: torch.device) -> None:
        self.filters = torch.from_numpy(mel_filters(n_mels)).to(device)
        self.window = torch.hann_window(N_FFT, device=device)
        self.device = device

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` (samples,) float32 on the device -> (n_mels, samples // 160)."""
        if audio.numel() <= N_FFT // 2:  # too short to reflect: what little there is, zero-padded
            audio = torch.nn.functional.pad(audio, (0, N_FFT // 2 + 1 - audio.numel()))
        spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = spec[:, :-1].abs() ** 2
        return torch.clamp(self.filters @ power, min=1e-10).log10()


def normalise(log_spec: torch.Tensor) -> torch.Tensor:
    """Whisper's dynamic-range clamp to 8 decades under the maximum, and scaling."""
    return (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
