"""MuseTalk's UNet: a diffusers ``UNet2DConditionModel`` built from ``musetalk.json``.

It is Stable Diffusion 1.x's UNet with 8 input channels (masked-face latent + reference
latent), 4 output channels and a 384-wide cross-attention fed with Whisper states. It
runs one step at timestep 0: not diffusion, single-step inpainting of the lower face.

Both releases ship the same architecture: v1.0 as ``musetalk/pytorch_model.bin``, v1.5
as ``musetalkV15/unet.pth``; each is a plain ``torch.save`` of the state dict.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, assign_state_dict, load_state_dict, strip_prefix

log = logging.getLogger(__name__)

#: ``musetalk/musetalk.json`` as released (the config only; the weights are downloaded).
MUSETALK_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
MUSETALK_UNET_PARAMETERS = 849_947_844
LATENT_CHANNELS_IN = 8
LATENT_CHANNELS_OUT = 4
CROSS_ATTENTION_DIM = 384


def read_config(path: Path | str) -> dict[str, Any]:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable UNet config ({exc})") from exc
    check_config(config, path)
    return config


def check_config(config: dict[str, Any], source: Path | str = "config") -> None:
    """MuseTalk's data contract: 8 channels in, 4 out, 384-wide audio cross-attention."""
    got = (config.get("in_channels"), config.get("out_channels"), config.get("cross_attention_dim"))
    want = (LATENT_CHANNELS_IN, LATENT_CHANNELS_OUT, CROSS_ATTENTION_DIM)
    if got != want:
        raise CheckpointError(f"{source}: not a MuseTalk UNet config (in/out/cross-attention {got}, expected {want})")


def build_unet(config: dict[str, Any], device: str | torch.device = "meta") -> torch.nn.Module:
    """The architecture alone; on ``meta`` it costs no memory (for counting and loading)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return UNet2DConditionModel.from_config(config)


def load_unet(
    config_path: Path | str,
    weights_path: Path | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Build from ``musetalk.json`` and load ``pytorch_model.bin`` / ``unet.pth``."""
    config = read_config(config_path)
    model = build_unet(config, "meta")
    state = strip_prefix(load_state_dict(weights_path), "module.")
    assign_state_dict(model, state, "MuseTalk UNet", weights_path)
    # nn.Module.to: diffusers' override only adds a warning about fp32-pinned modules these models do not have
    model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("UNet %s loaded (%d parameters) on %s as %s", Path(weights_path).name,
             sum(p.numel() for p in model.parameters()), device, dtype)
    return model


def unet_step(unet: torch.nn.Module, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """One MuseTalk step: (B, 8, 32, 32) latents + (B, 50, 384) audio -> (B, 4, 32, 32)."""
    timestep = torch.zeros(1, dtype=torch.long, device=latents.device)
    return unet(latents, timestep, encoder_hidden_states=audio, return_dict=False)[0]
