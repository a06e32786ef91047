"""One utterance's MuseTalk audio features, computed as MuseTalk computes them.

Whisper's encoder is not causal (every state attends to its whole 30 s context) and its
log-mel is normalised by a maximum over the audio, so a state depends on all of the
utterance. MuseTalk encodes the utterance in one go:

* v1.5 (``musetalk/utils/audio_processor.py``: Hugging Face's ``WhisperFeatureExtractor``
  and ``WhisperModel``): the audio in 30 s segments, each zero-padded to 30 s, its log-mel
  normalised by its own maximum, one encoder pass per segment; the five hidden states
  with the last one after ``ln_post``; steps beyond ``floor(samples / 320)`` are zeros.
* v1.0 (its own copy of openai-whisper, ``transcribe``): the log-mel of the unpadded
  audio, normalised by the maximum over the whole utterance, cut into 3000-frame
  segments and each zero-padded (in the normalised domain) to 3000 frames; the states
  before ``ln_post``; ``floor(samples / 320)`` steps, the edge step repeated beyond.

A video frame ``f``'s feature is then the window of steps ``2f-4 ... 2f+5`` (10 steps x
5 states = 50 x 384) plus a sinusoidal positional encoding (``models.positional``).
Every sample of audio lands in a frame: ``ceil(samples / 640)`` frames in all (the
reference's scripts drop the last one or two).

Streaming. ``UtteranceFeatures`` keeps the utterance's audio as it arrives and computes a
frame's feature when the frame is taken, from an encoder pass over *all the audio so
far*, padded exactly as above. When the audio is complete by then (``finish`` was called:
a TTS sentence, an upload, an offline job), the feature is the reference's. When more
audio comes later, the frames already taken were computed without it; that is the price
of speaking before an utterance has ended, and the benchmark measures it. A pass is run
again only when audio has arrived since the last one, and only for the segments that
hold frames still to be taken. ``encode_pending`` runs the passes of many utterances as
one batched encoder call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from media.pcm import FloatPcm
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME, frames_for_samples
from models.positional import sinusoid_table

from .encoder import N_STATES, WhisperAudioEncoder
from .mel import N_FFT, SEGMENT_FRAMES, SEGMENT_SAMPLES, SEGMENT_STEPS, STEP_SAMPLES, LogMelSpectrogram, normalise

VERSIONS = ("v15", "v1")
STEPS_PER_FRAME = SAMPLES_PER_FRAME // STEP_SAMPLES  # 2
WINDOW_BEFORE = 4  # steps before the frame's first step (-80 ms)
WINDOW_STEPS = 10  # steps per frame window (-80 ms ... +120 ms)
# Audio a frame's window reaches past the frame's start: its last step (2f + 5) ends at
# 640 f + 1920, and the encoder's convolutions see one mel frame (200 samples) beyond.
WINDOW_REACH = (WINDOW_STEPS - WINDOW_BEFORE) * STEP_SAMPLES + N_FFT // 2
DEFAULT_RIGHT_CONTEXT_S = 0.5


def window_indices(frame: int) -> range:
    """Encoder steps of video frame ``frame``'s window: -80 ms ... +120 ms around it."""
    first = STEPS_PER_FRAME * frame - WINDOW_BEFORE
    return range(first, first + WINDOW_STEPS)


def resolve_step(index: int, total_steps: int, version: str) -> int | None:
    """Which step fills window slot ``index``: v1.0 repeats the edge steps, v1.5 pads with
    zeros (None)."""
    if 0 <= index < total_steps:
        return index
    if version == "v1" and total_steps > 0:
        return min(max(index, 0), total_steps - 1)
    return None


def steps_for_samples(samples: int, version: str) -> int:
    """Encoder steps the release keeps: ``floor(samples / 320)``, a partial last step
    dropped. v1.5 computes it in floating point as ``floor(seconds * 50)``, which comes
    out one short for some lengths (2.3 s: 114.99999999999999); it is matched as it is."""
    if version == "v15":
        return math.floor(samples / SAMPLE_RATE * (SAMPLE_RATE // STEP_SAMPLES))
    return samples // STEP_SAMPLES


def encode(encoder: WhisperAudioEncoder, mels: torch.Tensor, version: str) -> torch.Tensor:
    """(B, n_mels, 3000) normalised segments -> (B, 1500, 5, 384) states as ``version`` takes them."""
    with torch.inference_mode():
        states, normed = encoder(mels)
        if version == "v15":  # the HF encoder's last hidden state is after its final layer norm
            states = torch.cat([states[:, :, :-1], normed[:, :, None]], dim=2)
        return states


class UtteranceFeatures:
    """Features of one utterance; see the module docstring."""

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        version: str,
        dtype: torch.dtype | None = None,
        right_context_s: float = DEFAULT_RIGHT_CONTEXT_S,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown MuseTalk version {version!r}: v15 or v1")
        self.encoder = encoder
        self.version = version
        self.device = encoder.conv1.weight.device
        self.dtype = dtype or encoder.conv1.weight.dtype
        self.right_context = max(0, round(right_context_s * SAMPLE_RATE))
        self._mel = LogMelSpectrogram(encoder.dims.n_mels, self.device)
        self._pe = sinusoid_table(WINDOW_STEPS * N_STATES, encoder.dims.n_audio_state).to(self.device)
        self._audio = np.zeros(SAMPLE_RATE, np.float32)  # capacity doubles as audio arrives
        self._samples = 0
        self._finished = False
        self._taken = 0  # frames handed out
        self._states: dict[int, torch.Tensor] = {}  # segment -> (1500, 5, 384), for _states_at samples
        self._states_at = -1
        self._v1_mel: torch.Tensor | None = None  # v1.0: the whole utterance's normalised log-mel, for _states_at
        self.passes = 0  # encoder passes run (segments encoded), for figures

    # ---- audio in ----
    @property
    def samples(self) -> int:
        return self._samples

    @property
    def finished(self) -> bool:
        return self._finished

    def push(self, pcm: FloatPcm) -> None:
        if self._finished:
            raise RuntimeError("push() after finish(): start a new stream for the next utterance")
        x = np.asarray(pcm, np.float32).reshape(-1)
        if self._samples + x.size > self._audio.size:
            grown = np.zeros(max(2 * self._audio.size, self._samples + x.size), np.float32)
            grown[: self._samples] = self._audio[: self._samples]
            self._audio = grown
        self._audio[self._samples : self._samples + x.size] = x
        self._samples += x.size

    def finish(self) -> None:
        self._finished = True

    # ---- frames out ----
    def frames_total(self) -> int | None:
        """Frames of the whole utterance, once its audio is complete."""
        return frames_for_samples(self._samples) if self._finished else None

    def ready(self) -> int:
        if self._finished:
            return frames_for_samples(self._samples) - self._taken
        # frames whose window, and right_context beyond it, have arrived
        known = self._samples - WINDOW_REACH - self.right_context
        return max(0, known // SAMPLES_PER_FRAME + 1 - self._taken) if known >= 0 else 0

    def pending(self, n: int) -> list[tuple[int, torch.Tensor]]:
        """The segments an encoder pass must (re)compute before the next ``n`` frames can be
        taken: (segment index, normalised log-mel (n_mels, 3000))."""
        if self._states_at != self._samples:
            self._invalidate()
        return [(g, self._segment_mel(g)) for g in self._segments_for(n) if g not in self._states]

    def accept(self, segment: int, states: torch.Tensor) -> None:
        """The encoder's states for ``segment`` (from a pass over ``pending``'s mel)."""
        self._states[segment] = states
        self._states_at = self._samples
        self.passes += 1

    def take(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` frames' (50, 384) features, in the engine's dtype, on its device."""
        if n > self.ready():
            raise ValueError(f"{n} frames asked for, {self.ready()} ready")
        if n <= 0:
            return []
        todo = self.pending(n)
        if todo:
            for (g, _mel), states in zip(todo, encode(self.encoder, torch.stack([m for _g, m in todo]), self.version), strict=True):
                self.accept(g, states)
        total = steps_for_samples(self._samples, self.version)
        first = self._taken
        rows = [[resolve_step(i, total, self.version) for i in window_indices(f)] for f in range(first, first + n)]
        used = sorted({i // SEGMENT_STEPS for row in rows for i in row if i is not None})
        features: torch.Tensor
        if used:
            base = used[0] * SEGMENT_STEPS
            states = torch.cat([self._states[g] for g in range(used[0], used[-1] + 1)])
            zero = states.shape[0]  # the zero row appended below: v1.5's padding
            index = torch.tensor([[zero if i is None else i - base for i in row] for row in rows], device=self.device)
            padded = torch.cat([states, torch.zeros_like(states[:1])])
            windows = padded[index].reshape(n, WINDOW_STEPS * N_STATES, -1)
            features = (windows.float() + self._pe).to(self.dtype)
        else:  # no audio step at all (under 20 ms of audio): zeros, as v1.5 pads
            features = self._pe.expand(n, -1, -1).to(self.dtype)
        self._taken += n
        self._drop_done_segments()
        return list(features.unbind(0))

    # ---- the passes ----
    def _segments_for(self, n: int) -> list[int]:
        total = steps_for_samples(self._samples, self.version)
        if total == 0:
            return []
        steps = [
            s for f in (self._taken, self._taken + n - 1)
            for i in window_indices(f) if (s := resolve_step(i, total, self.version)) is not None
        ]
        if not steps:
            return []
        return list(range(min(steps) // SEGMENT_STEPS, max(steps) // SEGMENT_STEPS + 1))

    def _invalidate(self) -> None:
        """New audio since the last pass: what it may have changed must be computed again.
        A v1.5 segment depends only on its own 30 s; v1.0's normalisation spans them all."""
        if self.version == "v15":
            whole = self._samples // SEGMENT_SAMPLES  # segments complete before the new audio
            complete_before = min(whole, max(self._states_at, 0) // SEGMENT_SAMPLES)
            self._states = {g: s for g, s in self._states.items() if g < complete_before}
        else:
            self._states.clear()
            self._v1_mel = None
        self._states_at = self._samples

    def _segment_mel(self, g: int) -> torch.Tensor:
        if self.version == "v15":
            audio = torch.zeros(SEGMENT_SAMPLES, dtype=torch.float32)
            part = self._audio[g * SEGMENT_SAMPLES : min((g + 1) * SEGMENT_SAMPLES, self._samples)]
            audio[: part.size] = torch.from_numpy(part)
            return normalise(self._mel(self._to_device(audio)))
        if self._v1_mel is None:
            audio = torch.from_numpy(self._audio[: self._samples].copy())
            self._v1_mel = normalise(self._mel(self._to_device(audio)))
        mel = self._v1_mel[:, g * SEGMENT_FRAMES : (g + 1) * SEGMENT_FRAMES]
        return torch.nn.functional.pad(mel, (0, SEGMENT_FRAMES - mel.shape[1]))  # zeros: v1.0's pad_or_trim

    def _to_device(self, audio: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return audio.pin_memory().to(self.device, non_blocking=True)
        return audio.to(self.device)

    def _drop_done_segments(self) -> None:
        """States no frame still to come can use are freed."""
        first_step = max(STEPS_PER_FRAME * self._taken - WINDOW_BEFORE, 0)
        for g in [g for g in self._states if (g + 1) * SEGMENT_STEPS <= first_step]:
            del self._states[g]


def encode_pending(wants: Sequence[tuple[UtteranceFeatures, int]]) -> None:
    """Run every pass the next ``n`` frames of each utterance need as one batched encoder
    call (the utterances share one encoder and version), so ``take`` then only gathers."""
    jobs = [(stream, g, mel) for stream, n in wants if n > 0 and n <= stream.ready() for g, mel in stream.pending(n)]
    if not jobs:
        return
    encoder, version = jobs[0][0].encoder, jobs[0][0].version
    states = encode(encoder, torch.stack([mel for _s, _g, mel in jobs]), version)
    for (stream, g, _mel), st in zip(jobs, states, strict=True):
        stream.accept(g, st)
