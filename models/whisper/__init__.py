"""Whisper tiny audio features for MuseTalk, computed incrementally as audio streams in.

* ``encoder``   - Whisper tiny's audio encoder from ``tiny.pt`` (or the HF layout), and
  which of its states each MuseTalk release takes
* ``mel``       - Whisper's log-mel spectrogram, computable a piece at a time
* ``streaming`` - encoder states as audio arrives, each block encoded in a window of context
* ``windows``   - one (50, 384) feature per 40 ms video frame from those states
"""
from __future__ import annotations

from .encoder import EncoderDims, WhisperAudioEncoder, load_whisper_encoder, sinusoids
from .mel import LogMel, mel_filters, normalise_log_mel
from .streaming import StreamConfig, WhisperStepStream
from .windows import FrameFeatureStream, lookahead_s, resolve_step, window_indices

__all__ = [
    "EncoderDims",
    "FrameFeatureStream",
    "LogMel",
    "StreamConfig",
    "WhisperAudioEncoder",
    "WhisperStepStream",
    "load_whisper_encoder",
    "lookahead_s",
    "mel_filters",
    "normalise_log_mel",
    "resolve_step",
    "sinusoids",
    "window_indices",
]
