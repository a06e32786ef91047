"""The image autoencoder: ``stabilityai/sd-vae-ft-mse`` as a diffusers ``AutoencoderKL``.

MuseTalk works in its latent space: a 256x256 RGB face becomes 4x32x32, times the
scaling factor 0.18215. The per-frame UNet input is the latent of the face with its lower
half blanked next to the latent of the whole face (8x32x32); the UNet's output latent is
decoded back to a 256x256 face.

Loaded from ``config.json`` plus ``diffusion_pytorch_model.safetensors`` or ``.bin``;
checkpoints saved by diffusers before 0.14 name the attention weights ``query``/``key``/
``value``/``proj_attn`` and are renamed on load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import CheckpointError, assign_state_dict, load_state_dict

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

log = logging.getLogger(__name__)

SCALING_FACTOR = 0.18215
FACE_SIZE = 256
LATENT_SIZE = 32

#: ``stabilityai/sd-vae-ft-mse/config.json`` (architecture keys).
SD_VAE_FT_MSE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def weights_file(folder: Path | str) -> Path:
    folder = Path(folder)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors or .bin")


def build_vae(config: dict[str, Any], device: str | torch.device = "meta") -> AutoencoderKL:
    from diffusers import AutoencoderKL

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device):
        return AutoencoderKL.from_config(config)


def convert_legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pre-0.14 attention keys to today's; 1x1-conv shaped weights become Linear."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if parts[-1] == "weight" and value.ndim == 4:
                value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_vae(folder: Path | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: unreadable VAE config ({exc})") from exc
    if config.get("latent_channels") != 4:
        raise CheckpointError(f"{folder}: MuseTalk needs a 4-channel latent VAE, config says {config.get('latent_channels')}")
    path = weights_file(folder)
    model = build_vae(config, "meta")
    state = convert_legacy_keys(load_state_dict(path))
    assign_state_dict(model, state, "AutoencoderKL", path)
    # nn.Module.to: diffusers' override only adds a warning about fp32-pinned modules these models do not have
    model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
    log.info("VAE %s loaded on %s as %s", path.name, device, dtype)
    return model


def scaling_factor(vae: AutoencoderKL) -> float:
    return float(getattr(vae.config, "scaling_factor", SCALING_FACTOR) or SCALING_FACTOR)


def faces_to_tensor(faces: np.ndarray, device: torch.device | str, dtype: torch.dtype, half_mask: bool) -> torch.Tensor:
    """(B, 256, 256, 3) uint8 RGB -> (B, 3, 256, 256) in [-1, 1]; with ``half_mask`` the
    lower half is black before normalising (-1 after), as the reference masks it."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if half_mask:
        x[:, :, x.shape[2] // 2 :, :] = 0.0
    return (x * 2.0 - 1.0).to(dtype)


@torch.no_grad()
def encode_faces(vae: AutoencoderKL, faces: np.ndarray) -> torch.Tensor:
    """MuseTalk's UNet input for 256x256 RGB faces: (B, 8, 32, 32) = [masked, whole].

    Uses the posterior mean, not a sample (the reference samples, so its cached latents
    change from run to run; its training code takes the mode, as here)."""
    param = next(vae.parameters())
    sf = scaling_factor(vae)
    masked = vae.encode(faces_to_tensor(faces, param.device, param.dtype, True)).latent_dist.mode() * sf
    whole = vae.encode(faces_to_tensor(faces, param.device, param.dtype, False)).latent_dist.mode() * sf
    return torch.cat([masked, whole], dim=1)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, 32, 32) UNet output -> (B, 3, 256, 256) float in [0, 255] (RGB), on device."""
    param = next(vae.parameters())
    image = vae.decode(latents.to(param.dtype) / scaling_factor(vae), return_dict=False)[0]
    return ((image.float() / 2.0 + 0.5).clamp(0.0, 1.0)) * 255.0
