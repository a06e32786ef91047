"""Whisper-tiny audio features for MuseTalk, computed incrementally as audio streams in.

What MuseTalk feeds its UNet per video frame (25 fps) is a window of Whisper encoder
states (50 steps a second, 20 ms each): the 10 steps from -80 ms to +120 ms around the
frame (steps 2f-4 ... 2f+5), each carrying 5 hidden states of 384 -> 50 x 384, plus a
sinusoidal positional encoding over those 50 rows.

The two releases take the 5 states differently from one and the same Whisper tiny:

* v1.0 (a patched openai-whisper): the embedding output and the outputs of the four
  blocks, all *before* the final layer norm ``ln_post``; indices before the first or
  after the last step repeat the edge step.
* v1.5 (HF ``WhisperEncoder(output_hidden_states=True)``): the embedding output, blocks
  1-3, and block 4 *after* ``ln_post`` (transformers 4.x appends the normed state as the
  last hidden state); indices outside the audio are zeros.

So both use 5 states; only the fifth differs (raw vs layer-normed) and the padding.

Streaming. The reference encodes each 30 s segment (audio zero-padded to 30 s) in one
pass. Whisper's encoder is not causal, so a state depends on the audio around it; here
each block of ``hop`` steps is encoded inside a window with ``left`` and ``right``
context steps (defaults 1.5 s / 0.5 s, 0.2 s hop), and only the block's own steps are
kept. Windows stay inside the reference's 30 s segments and keep their *absolute*
positional embeddings (``positional_embedding[a:b]`` for segment steps ``a..b``): with
context covering the segment this reproduces the reference exactly (a test pins it),
and with less context a state differs only by the far audio it no longer attends to.
The log-mel normalisation (``max(x, M - 8)``) uses ``M`` = the maximum over the
segment's frames up to the window's end, which is the reference's segment maximum once
the window reaches the segment end. Mel frames themselves are computed exactly as for
the padded segment (reflection at the segment's edges, zeros after the audio).
Results do not depend on how the PCM is chunked.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, assign_state_dict, load_state_dict
from .positional import sinusoid_table

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
N_FFT = 400
HOP_LENGTH = 160
STEP_SAMPLES = 2 * HOP_LENGTH  # one encoder step: 20 ms
SEGMENT_STEPS = 1500  # Whisper's 30 s context
SEGMENT_FRAMES = 2 * SEGMENT_STEPS
SEGMENT_SAMPLES = SEGMENT_FRAMES * HOP_LENGTH
FRAME_SAMPLES = SAMPLE_RATE // 25  # 640: one video frame
STEPS_PER_FRAME = 2
WINDOW_BEFORE = 4  # steps before the frame's first step (-80 ms)
WINDOW_STEPS = 10  # steps per frame window
N_STATES = 5
STATE_DIM = 384


# ---- the encoder ------------------------------------------------------------------------


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """Whisper's encoder positional embedding (its checkpoints carry the same table)."""
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # in float32 whatever the model dtype, as openai-whisper does
    return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.n_head, d // self.n_head)
        q = self.query(x).view(shape).transpose(1, 2)
        k = self.key(x).view(shape).transpose(1, 2)
        v = self.value(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d_head), as whisper's (d^-1/4)^2
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.attn = _Attention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_layer_norm(self.attn_ln, x))
        return x + self.mlp(_layer_norm(self.mlp_ln, x))


@dataclass(frozen=True)
class EncoderDims:
    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4


class WhisperAudioEncoder(nn.Module):
    """Whisper's audio encoder with openai-whisper's parameter names (``tiny.pt``'s
    ``encoder.*`` keys load as they are), able to run on any slice of its 30 s context."""

    def __init__(self, dims: EncoderDims = EncoderDims()) -> None:
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(_Block(dims.n_audio_state, dims.n_audio_head) for _ in range(dims.n_audio_layer))
        self.ln_post = nn.LayerNorm(dims.n_audio_state)

    def forward(self, mel: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, n_mels, 2T) normalised log-mel for segment steps ``start..start+T``.

        Returns ``states`` (B, T, n_layer + 1, d): the embedding output and every block's
        output before ``ln_post``, and ``normed`` (B, T, d): ``ln_post`` of the last.
        """
        dtype = self.conv1.weight.dtype
        x = F.gelu(self.conv1(mel.to(dtype)))
        x = F.gelu(self.conv2(x)).permute(0, 2, 1)
        t = x.shape[1]
        if start + t > self.positional_embedding.shape[0]:
            raise ValueError(f"steps {start}..{start + t} exceed Whisper's {self.positional_embedding.shape[0]} positions")
        x = x + self.positional_embedding[start : start + t].to(dtype)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states, dim=2), _layer_norm(self.ln_post, x)


_HF_BLOCK = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}


def _from_hf(state: dict[str, Any]) -> dict[str, Any]:
    """transformers' ``WhisperModel`` encoder keys -> openai-whisper's."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if not key.startswith("encoder."):
            continue
        key = key.removeprefix("encoder.")
        if key == "embed_positions.weight":
            out["positional_embedding"] = value
        elif key.startswith("layer_norm."):
            out["ln_post." + key.split(".", 1)[1]] = value
        elif key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            name, _, leaf = rest.rpartition(".")
            out[f"blocks.{i}.{_HF_BLOCK.get(name, name)}.{leaf}"] = value
        else:
            out[key] = value
    return out


def load_whisper_encoder(
    path: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperAudioEncoder:
    """From openai-whisper's ``tiny.pt`` ({"dims", "model_state_dict"}) or from the HF
    layout (``config.json`` + ``pytorch_model.bin``/``model.safetensors`` in one folder)."""
    path = Path(path)
    raw = load_state_dict(path)
    if "model_state_dict" in raw and "dims" in raw:
        try:
            d = raw["dims"]
            dims = EncoderDims(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
            state = {k.removeprefix("encoder."): v for k, v in raw["model_state_dict"].items() if k.startswith("encoder.")}
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not an openai-whisper checkpoint (dims incomplete: {exc})") from exc
    else:
        try:
            cfg = json.loads((path.parent / "config.json").read_text())
            dims = EncoderDims(cfg["num_mel_bins"], cfg["max_source_positions"], cfg["d_model"],
                               cfg["encoder_attention_heads"], cfg["encoder_layers"])
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: not a tiny.pt checkpoint and no usable config.json beside it ({exc})") from exc
        state = _from_hf(raw)
    if dims.n_audio_layer + 1 != N_STATES or dims.n_audio_state != STATE_DIM:
        raise CheckpointError(
            f"{path}: MuseTalk needs Whisper tiny (4 layers, 384 wide), this is {dims.n_audio_layer} x {dims.n_audio_state}"
        )
    with torch.device("meta"):
        model = WhisperAudioEncoder(dims)
    assign_state_dict(model, state, "Whisper encoder", path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---- log-mel ----------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:  # Slaney's scale, as librosa's default
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    mels = f / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> np.ndarray:
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

    def __call__(self, padded: np.ndarray) -> torch.Tensor:
        """``padded`` = signal positions [160 f0 - 200, 160 f1 + 40) -> frames f0..f1 (n_mels, f1 - f0)."""
        x = torch.from_numpy(np.ascontiguousarray(padded, np.float32)).to(self.device)
        spec = torch.stft(x, N_FFT, HOP_LENGTH, window=self.window, center=False, return_complex=True)
        power = spec.abs() ** 2
        return torch.clamp(self.filters @ power, min=1e-10).log10()


def normalise_log_mel(log_spec: torch.Tensor, maximum: torch.Tensor | float) -> torch.Tensor:
    """Whisper's dynamic-range clamp and scaling."""
    return (torch.maximum(log_spec, torch.as_tensor(maximum, device=log_spec.device) - 8.0) + 4.0) / 4.0


def _signal(segment: np.ndarray, known: int, final: bool, a: int, b: int) -> np.ndarray:
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


# ---- streaming encoder states -----------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    """Encoder window geometry in 20 ms steps (see the module docstring)."""

    hop: int = 10
    left: int = 75
    right: int = 25

    @classmethod
    def from_seconds(cls, hop_s: float = 0.2, left_s: float = 1.5, right_s: float = 0.5) -> StreamConfig:
        steps = lambda s: int(round(s * SAMPLE_RATE / STEP_SAMPLES))  # noqa: E731
        return cls(max(1, steps(hop_s)), max(0, steps(left_s)), max(0, steps(right_s)))

    @property
    def lookahead_s(self) -> float:
        """The most audio past a frame needed before its feature exists."""
        return (self.hop + self.right + WINDOW_STEPS - WINDOW_BEFORE) * STEP_SAMPLES / SAMPLE_RATE


class WhisperStepStream:
    """PCM in, encoder states (steps, 5, 384) out, in order, as their context arrives."""

    def __init__(self, encoder: WhisperAudioEncoder, version: str, config: StreamConfig = StreamConfig()) -> None:
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
    def push(self, pcm: np.ndarray) -> torch.Tensor:
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

    def _ensure_mel(self, frames: int) -> torch.Tensor:
        if frames > self._mel_frames:
            f0, f1 = self._mel_frames, frames
            # frame f covers signal positions [160 f - 200, 160 f + 200)
            chunk = _signal(self._segment, self._known, self._final,
                            HOP_LENGTH * f0 - N_FFT // 2, HOP_LENGTH * (f1 - 1) + N_FFT // 2)
            new = self._mel(chunk)
            self._log_mel.append(new)
            self._mel_frames = f1
            peak = new.max()
            self._mel_max = peak if self._mel_max is None else torch.maximum(self._mel_max, peak)
        return torch.cat(self._log_mel, dim=1) if len(self._log_mel) > 1 else self._log_mel[0]

    def _encode(self, a: int, b: int) -> torch.Tensor:
        log_mel = self._ensure_mel(2 * b)
        if len(self._log_mel) > 1:
            self._log_mel = [log_mel]  # keep one tensor, not a growing list
        mel = normalise_log_mel(log_mel[:, 2 * a : 2 * b], self._mel_max)
        states, normed = self.encoder(mel[None], start=a)
        states = states[0]
        if self.version == "v15":
            states = torch.cat([states[:, :-1], normed[0][:, None]], dim=1)
        return states


def reference_states(encoder: WhisperAudioEncoder, pcm: np.ndarray, version: str) -> torch.Tensor:
    """The reference's offline computation: each 30 s segment zero-padded to 30 s, one
    full encoder pass, states for the steps that hold audio. For tests and comparisons."""
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


# ---- per-frame windows ------------------------------------------------------------------


def window_indices(frame: int) -> range:
    """Encoder steps of video frame ``frame``'s window: -80 ms ... +120 ms around it."""
    first = STEPS_PER_FRAME * frame - WINDOW_BEFORE
    return range(first, first + WINDOW_STEPS)


def resolve_step(index: int, total_steps: int, version: str) -> int | None:
    """Which step fills window slot ``index``: v1.0 repeats the edge steps, v1.5 pads
    with zeros (None)."""
    if 0 <= index < total_steps:
        return index
    if version == "v1":
        return min(max(index, 0), max(total_steps - 1, 0))
    return None


def frames_for_samples(samples: int) -> int:
    """Video frames that cover ``samples`` of audio: every sample lands in a frame."""
    return -(-samples // FRAME_SAMPLES)


class FrameFeatureStream:
    """Per-utterance MuseTalk features: PCM in, one (50, 384) tensor per video frame out
    (positional encoding added, in the model dtype, on the model's device)."""

    def __init__(self, encoder: WhisperAudioEncoder, version: str, config: StreamConfig = StreamConfig(),
                 dtype: torch.dtype | None = None) -> None:
        self.steps = WhisperStepStream(encoder, version, config)
        self.version = version
        self.dtype = dtype or encoder.conv1.weight.dtype
        self._pe = sinusoid_table(WINDOW_STEPS * N_STATES, encoder.dims.n_audio_state).to(self.steps.device)
        self._buffer: torch.Tensor | None = None  # steps from _base on
        self._base = 0
        self._next_frame = 0
        self._flushed = False

    def push(self, pcm: np.ndarray) -> list[torch.Tensor]:
        self._add(self.steps.push(pcm))
        have = self._base + (0 if self._buffer is None else self._buffer.shape[0])
        # a frame is ready when its window's last step (2f + 5) exists
        ready = (have - (WINDOW_STEPS - WINDOW_BEFORE)) // STEPS_PER_FRAME + 1
        return self._emit(max(ready, 0), total_steps=None)

    def flush(self) -> list[torch.Tensor]:
        if self._flushed:
            return []
        self._flushed = True
        self._add(self.steps.finish())
        return self._emit(frames_for_samples(self.steps.samples), total_steps=self.steps.total_steps())

    def _add(self, states: torch.Tensor) -> None:
        if states.shape[0]:
            self._buffer = states if self._buffer is None else torch.cat([self._buffer, states])

    def _emit(self, upto: int, total_steps: int | None) -> list[torch.Tensor]:
        if upto <= self._next_frame or self._buffer is None:
            return []
        total = total_steps if total_steps is not None else 1 << 30  # no end known yet
        rows = [
            [-1 if (src := resolve_step(i, total, self.version)) is None else src - self._base for i in window_indices(f)]
            for f in range(self._next_frame, upto)
        ]
        # one gather for all ready frames; index -1 picks the zero row appended at the end
        padded = torch.cat([self._buffer, torch.zeros_like(self._buffer[:1])])
        index = torch.tensor(rows, device=padded.device).remainder_(padded.shape[0])
        windows = padded[index].reshape(len(rows), WINDOW_STEPS * N_STATES, -1)
        features = (windows.float() + self._pe).to(self.dtype)
        self._next_frame = upto
        # keep only the steps later frames can still use
        keep_from = max(0, STEPS_PER_FRAME * self._next_frame - WINDOW_BEFORE - 1)
        if total_steps is None and keep_from > self._base:
            drop = min(keep_from - self._base, self._buffer.shape[0] - 1)
            self._buffer = self._buffer[drop:]
            self._base += drop
        return list(features.unbind(0))
