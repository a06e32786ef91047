"""The MuseTalk reference's offline Whisper computation, to hold the streaming features to.

The reference encodes the whole utterance at once: each 30 s segment zero-padded to
30 s, one full encoder pass, the states of the steps that hold audio. The product
computes the same states incrementally (``models.whisper.streaming``); the tests compare
the two.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from models.whisper.encoder import WhisperAudioEncoder
from models.whisper.mel import N_FFT, SEGMENT_FRAMES, SEGMENT_SAMPLES, STEP_SAMPLES, LogMel, normalise_log_mel


def reference_states(encoder: WhisperAudioEncoder, pcm: npt.ArrayLike, version: str) -> torch.Tensor:
    """(steps, 5, 384) encoder states of ``pcm`` (16 kHz float) as the reference computes
    them for ``version``: v1.5's fifth state layer-normed, v1.0's raw."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    total = -(-pcm.size // STEP_SAMPLES)
    device = encoder.conv1.weight.device
    mel = LogMel(encoder.dims.n_mels, device)
    out = []
    with torch.no_grad():
        for g in range(max(1, -(-pcm.size // SEGMENT_SAMPLES))):
            seg = np.zeros(SEGMENT_SAMPLES, np.float32)
            part = pcm[g * SEGMENT_SAMPLES : (g + 1) * SEGMENT_SAMPLES]
            seg[: part.size] = part
            padded = np.pad(seg, N_FFT // 2, mode="reflect")
            log_spec = mel(padded)[:, :SEGMENT_FRAMES]
            norm = normalise_log_mel(log_spec, log_spec.max())
            states, normed = encoder(norm[None], start=0)
            states = states[0]
            if version == "v15":
                states = torch.cat([states[:, :-1], normed[0][:, None]], dim=1)
            out.append(states)
    return torch.cat(out)[:total]
