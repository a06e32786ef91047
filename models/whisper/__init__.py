"""Whisper tiny audio features for MuseTalk, computed as MuseTalk computes them.

* ``encoder``   - Whisper tiny's audio encoder from ``tiny.pt`` (or the HF layout), and
  which of its states each MuseTalk release takes
* ``mel``       - Whisper's time grid and mel filters
* ``utterance`` - one utterance's per-frame (50, 384) features: encoder passes over the
  whole utterance's audio (so far), batched across utterances
"""
from __future__ import annotations

from .encoder import EncoderDims, WhisperAudioEncoder, load_whisper_encoder, sinusoids
from .mel import LogMelSpectrogram, mel_filters, normalise
from .utterance import (
    DEFAULT_RIGHT_CONTEXT_S,
    UtteranceFeatures,
    encode,
    encode_pending,
    resolve_step,
    steps_for_samples,
    window_indices,
)

__all__ = [
    "DEFAULT_RIGHT_CONTEXT_S",
    "EncoderDims",
    "LogMelSpectrogram",
    "UtteranceFeatures",
    "WhisperAudioEncoder",
    "encode",
    "encode_pending",
    "load_whisper_encoder",
    "mel_filters",
    "normalise",
    "resolve_step",
    "sinusoids",
    "steps_for_samples",
    "window_indices",
]
