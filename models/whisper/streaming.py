"""Whisper encoder states computed incrementally as audio streams in.

The reference encodes each 30 s segment (audio zero-padded to 30 s) in one pass.
Whisper's encoder is not causal, so a state depends on the audio around it; here each
block of ``hop`` steps is encoded inside a window with ``left`` and ``right`` context
steps (defaults 1.5 s / 0.5 s, 0.2 s hop), and only the block's own steps are kept.
Windows stay inside the reference's 30 s segments and keep their *absolute* positional
embeddings (``positional_embedding[a:b]`` for segment steps ``a..b``): with context
covering the segment this reproduces the reference exactly (a test pins it), and with
less context a state differs only by the far audio it no longer attends to.

The log-mel normalisation (``max(x, M - 8)``) uses ``M`` = the maximum over the
segment's frames up to the window's end, which is the reference's segment maximum once
the window reaches the segment end. Mel frames themselves are computed exactly as for
the padded segment (see ``mel``). Results do not depend on how the PCM is chunked.

Each step comes out as MuseTalk's 5 states of its version: v1.5 swaps the last block's
raw output for its ``ln_post`` (see ``encoder``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from media.pcm import FloatPcm
from media.timing import SAMPLE_RATE

from .encoder import N_STATES, WhisperAudioEncoder
from .mel import (
    HOP_LENGTH,
    N_FFT,
    SEGMENT_SAMPLES,
    SEGMENT_STEPS,
    STEP_SAMPLES,
    LogMel,
    normalise_log_mel,
    padded_signal,
)


@dataclass(frozen=True)
class StreamConfig:
    """Encoder window geometry in 20 ms steps: blocks of ``hop`` steps, each encoded with
    ``left`` steps of context before it and ``right`` after."""

    hop: int = 10
    left: int = 75
    right: int = 25

    @classmethod
    def from_seconds(cls, hop_s: float = 0.2, left_s: float = 1.5, right_s: float = 0.5) -> StreamConfig:
        def steps(seconds: float) -> int:
            return round(seconds * SAMPLE_RATE / STEP_SAMPLES)

        return cls(max(1, steps(hop_s)), max(0, steps(left_s)), max(0, steps(right_s)))


DEFAULT_CONFIG = StreamConfig()


class WhisperStepStream:
    """PCM in, encoder states (steps, 5, 384) out, in order, as their context arrives."""

    def __init__(self, encoder: WhisperAudioEncoder, version: str, config: StreamConfig = DEFAULT_CONFIG) -> None:
        if version not in ("v1", "v15"):
            raise ValueError(f"unknown MuseTalk version {version!r}")
        self.encoder = encoder
        self.version = version
        self.config = config
        self.device = encoder.conv1.weight.device
        self._mel = LogMel(encoder.dims.n_mels, self.device)
        self._segment = np.zeros(SEGMENT_SAMPLES, np.float32)  # current segment's samples
        self._seg_index = 0
        self._known = 0  # samples of the current segment received
        self._total = 0  # samples of the utterance received
        self._log_mel: list[torch.Tensor] = []  # computed frames of the current segment
        self._mel_frames = 0
        self._mel_max: torch.Tensor | None = None
        self._block = 0  # next block (segment-local)
        self._emitted = 0  # steps emitted so far (utterance)
        self._final = False

    @property
    def samples(self) -> int:
        return self._total

    @property
    def steps_emitted(self) -> int:
        return self._emitted

    def total_steps(self) -> int:
        """Steps holding audio: ceil(samples / 320). Final only after ``finish``."""
        return -(-self._total // STEP_SAMPLES)

    @torch.no_grad()
    def push(self, pcm: FloatPcm) -> torch.Tensor:
        if self._final:
            raise RuntimeError("push after finish")
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        out: list[torch.Tensor] = []
        while pcm.size:
            room = SEGMENT_SAMPLES - self._known
            take = pcm[:room]
            self._segment[self._known : self._known + take.size] = take
            self._known += take.size
            self._total += take.size
            pcm = pcm[take.size :]
            out.extend(self._run_blocks())
        return self._cat(out)

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        """The audio ended: the remaining steps, with silence as right context."""
        self._final = True
        return self._cat(self._run_blocks())

    def _cat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if parts:
            return torch.cat(list(parts), dim=0)
        shape = (0, N_STATES, self.encoder.dims.n_audio_state)
        return torch.zeros(shape, dtype=self.encoder.conv1.weight.dtype, device=self.device)

    def _seg_steps_wanted(self) -> int:
        """Steps of the current segment that will be emitted (known once final)."""
        return min(SEGMENT_STEPS, self.total_steps() - self._seg_index * SEGMENT_STEPS)

    def _run_blocks(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        cfg = self.config
        while True:
            start = self._block * cfg.hop
            if self._final and start >= self._seg_steps_wanted():
                return out
            if start >= SEGMENT_STEPS:
                self._next_segment()
                continue
            stop = min(start + cfg.hop, SEGMENT_STEPS)
            a, b = max(0, start - cfg.left), min(stop + cfg.right, SEGMENT_STEPS)
            last_frame = 2 * b - 1
            needed = min(HOP_LENGTH * last_frame + N_FFT // 2, SEGMENT_SAMPLES)
            if not self._final and self._known < needed:
                return out
            states = self._encode(a, b)[start - a : stop - a]
            if self._final:
                states = states[: max(0, self._seg_steps_wanted() - start)]
            out.append(states)
            self._emitted += states.shape[0]
            self._block += 1

    def _next_segment(self) -> None:
        self._seg_index += 1
        self._segment[:] = 0.0
        self._known = 0  # push fills segments in order, so nothing of this one has arrived
        self._log_mel, self._mel_frames, self._mel_max, self._block = [], 0, None, 0

    def _ensure_mel(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The current segment's log-mel frames 0..``frames`` (at least), and their maximum."""
        if frames > self._mel_frames:
            f0, f1 = self._mel_frames, frames
            # frame f covers signal positions [160 f - 200, 160 f + 200)
            chunk = padded_signal(self._segment, self._known, self._final,
                                  HOP_LENGTH * f0 - N_FFT // 2, HOP_LENGTH * (f1 - 1) + N_FFT // 2)
            new = self._mel(chunk)
            self._log_mel.append(new)
            self._mel_frames = f1
            peak = new.max()
            self._mel_max = peak if self._mel_max is None else torch.maximum(self._mel_max, peak)
        if self._mel_max is None:
            raise ValueError("no log-mel frames asked for")
        log_mel = torch.cat(self._log_mel, dim=1) if len(self._log_mel) > 1 else self._log_mel[0]
        return log_mel, self._mel_max

    def _encode(self, a: int, b: int) -> torch.Tensor:
        log_mel, maximum = self._ensure_mel(2 * b)
        if len(self._log_mel) > 1:
            self._log_mel = [log_mel]  # keep one tensor, not a growing list
        mel = normalise_log_mel(log_mel[:, 2 * a : 2 * b], maximum)
        states, normed = self.encoder(mel[None], start=a)
        states = states[0]
        if self.version == "v15":
            states = torch.cat([states[:, :-1], normed[0][:, None]], dim=1)
        return states
