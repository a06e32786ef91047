"""Whisper tiny's audio encoder, the source of MuseTalk's audio features.

Our own module with openai-whisper's parameter names, so ``tiny.pt``'s ``encoder.*``
keys load as they are (the HF ``WhisperModel`` layout is mapped onto them); the
decoder is never built. It runs on any slice of its 30 s context, keeping the slice's
*absolute* positional embeddings, which is what lets ``streaming`` encode a window at
a time.

MuseTalk feeds its UNet 5 hidden states of 384 per 20 ms step, which is why only
Whisper tiny fits (4 blocks: the embedding output and one state per block). The two
releases take them differently from one and the same Whisper tiny, so ``forward``
returns both candidates for the fifth:

* v1.0 (a patched openai-whisper): the embedding output and the outputs of the four
  blocks, all *before* the final layer norm ``ln_post``.
* v1.5 (HF ``WhisperEncoder(output_hidden_states=True)``): the embedding output, blocks
  1-3, and block 4 *after* ``ln_post`` (transformers 4.x appends the normed state as the
  last hidden state).

So both use 5 states; only the fifth differs (raw vs layer-normed). (They also pad the
per-frame windows differently: see ``windows``.)
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import CheckpointError, assign_state_dict, load_state_dict

N_STATES = 5  # hidden states per step: the embedding output and Whisper tiny's 4 blocks
STATE_DIM = 384  # Whisper tiny's width


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

    positional_embedding: torch.Tensor  # a buffer: (n_audio_ctx, n_audio_state)

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


# ---- loading ----------------------------------------------------------------------------

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


def _from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' ``WhisperModel`` encoder keys -> openai-whisper's."""
    out: dict[str, torch.Tensor] = {}
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
