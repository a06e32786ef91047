"""Tiny random MuseTalk checkpoints in the real file formats, and small test avatars.

The checkpoints are written exactly where ``python -m models download`` puts the real
ones (``<data>/models/...``), with the real key names and containers, and recorded in
the manifest the way the downloader records them, so the engine loads them through its
product code path. Only the sizes are small: a 2-level UNet (with the real 8 in / 4 out
channels and 384-wide cross-attention), a narrow 4-level VAE (so 256 -> 32 latents,
scaling factor 0.18215), and Whisper tiny's real encoder dimensions (4 layers x 384:
MuseTalk's 5 hidden states need exactly that) with a one-layer toy decoder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from avatars.avatar import Avatar, save_avatar
from models.vae import SCALING_FACTOR, SD_VAE_FT_MSE_CONFIG
from models.weights import models_dir, record_in_manifest

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 2,
    "block_out_channels": [32, 64],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],  # attention at 16x16 keeps CPU tests fast
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 32,
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}
# The real sd-vae-ft-mse architecture, only narrower and shallower, so the layout
# (block types, channels in and out, latent size) cannot drift from the product's.
TINY_VAE_CONFIG = {
    **SD_VAE_FT_MSE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "scaling_factor": SCALING_FACTOR,
}
#: openai-whisper ModelDimensions: tiny's encoder, a toy decoder
TINY_WHISPER_DIMS = {
    "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
    "n_vocab": 64, "n_text_ctx": 8, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 1,
}
LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
#: MediaPipe 0.10.21's landmarks of the astronaut, stored for machines without mediapipe
#: (the bare GPU machine: that release needs numpy < 2); test_musetalk_render holds them
#: to a fresh detection wherever mediapipe is installed.
ASTRONAUT_LANDMARKS = Path(__file__).with_name("astronaut_landmarks.npy")


def _record(data_dir: Path, path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record_in_manifest(data_dir, path.relative_to(models_dir(data_dir)).as_posix(), path.stat().st_size, digest, "tests")


def tiny_unet(seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config({k: v for k, v in TINY_UNET_CONFIG.items() if not k.startswith("_")})


def tiny_vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL.from_config({k: v for k, v in TINY_VAE_CONFIG.items() if not k.startswith("_")})


def whisper_checkpoint(seed: int) -> dict:
    """``tiny.pt``'s structure: {"dims", "model_state_dict"} with fp16 tensors and the
    ``encoder.*`` / ``decoder.*`` key names of openai-whisper."""
    from models.whisper.encoder import EncoderDims, WhisperAudioEncoder, _Attention, _Block

    torch.manual_seed(seed)
    d = TINY_WHISPER_DIMS
    names = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")
    enc = WhisperAudioEncoder(EncoderDims(*(d[k] for k in names)))
    state = {f"encoder.{k}": v.half() for k, v in enc.state_dict().items()}
    s = d["n_text_state"]
    decoder = {
        "token_embedding.weight": torch.randn(d["n_vocab"], s) * 0.02,
        "positional_embedding": torch.randn(d["n_text_ctx"], s) * 0.02,
        "ln.weight": torch.ones(s),
        "ln.bias": torch.zeros(s),
    }
    for i in range(d["n_text_layer"]):  # whisper's decoder block: self-attn, cross-attn, mlp
        decoder.update({f"blocks.{i}.{k}": v for k, v in _Block(s, d["n_text_head"]).state_dict().items()})
        decoder.update({f"blocks.{i}.cross_attn.{k}": v for k, v in _Attention(s, d["n_text_head"]).state_dict().items()})
        decoder.update({f"blocks.{i}.cross_attn_ln.weight": torch.ones(s), f"blocks.{i}.cross_attn_ln.bias": torch.zeros(s)})
    state.update({f"decoder.{k}": v.half() for k, v in decoder.items()})
    return {"dims": dict(d), "model_state_dict": state}


def write_tiny_checkpoints(data_dir: Path, *, seed: int = 0, vae_format: str = "safetensors",
                           legacy_vae_keys: bool = False, versions: tuple[str, ...] = ("v15", "v1")) -> dict[str, Path]:
    """Write every file ``check_weights`` asks for, for ``versions``; returns their paths."""
    root = models_dir(data_dir)
    paths: dict[str, Path] = {}
    layouts = {"v1": ("musetalk", "pytorch_model.bin"), "v15": ("musetalkV15", "unet.pth")}
    for i, version in enumerate(versions):
        folder, name = layouts[version]
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "musetalk.json").write_text(json.dumps(TINY_UNET_CONFIG, indent=2))
        torch.save(tiny_unet(seed + 1 + i).state_dict(), root / folder / name)
        paths[f"unet-config-{version}"] = root / folder / "musetalk.json"
        paths[f"unet-{version}"] = root / folder / name
    (root / "sd-vae").mkdir(parents=True, exist_ok=True)
    (root / "sd-vae" / "config.json").write_text(json.dumps(TINY_VAE_CONFIG, indent=2))
    state = tiny_vae(seed + 10).state_dict()
    if legacy_vae_keys:
        state = {_legacy(k): v for k, v in state.items()}
    if vae_format == "safetensors":
        from safetensors.torch import save_file

        vae_path = root / "sd-vae" / "diffusion_pytorch_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(vae_path))
    else:
        vae_path = root / "sd-vae" / "diffusion_pytorch_model.bin"
        torch.save(state, vae_path)
    paths["vae-config"] = root / "sd-vae" / "config.json"
    paths["vae"] = vae_path
    (root / "whisper").mkdir(parents=True, exist_ok=True)
    torch.save(whisper_checkpoint(seed + 20), root / "whisper" / "tiny.pt")
    paths["whisper"] = root / "whisper" / "tiny.pt"
    for path in paths.values():
        _record(data_dir, path)
    return paths


def _legacy(key: str) -> str:
    """A diffusers-0.4-era VAE key (what sd-vae-ft-mse's .bin was saved with)."""
    for new, old in LEGACY_ATTENTION.items():
        if f"attentions.0.{new}." in key:
            return key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    return key


# ---- avatars ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def astronaut_with_landmarks() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's public-domain astronaut portrait (512 x 512) and its MediaPipe
    landmarks, detected once per test run."""
    from skimage import data

    from avatars.landmarks import FaceMeshDetector

    image = data.astronaut()
    if importlib.util.find_spec("mediapipe") is None:
        return image, np.load(ASTRONAUT_LANDMARKS)
    with FaceMeshDetector(video=False) as detector:
        landmarks = detector(image)
    assert np.isfinite(landmarks).all(), "MediaPipe found no face on the astronaut"
    return image, landmarks


def make_avatar(data_dir: Path, name: str, frames: int = 6, no_face: tuple[int, ...] = (), shift: int = 3,
                flip: bool = False) -> Avatar:
    """An avatar of the astronaut moving ``shift`` pixels a frame (landmarks moved with
    it); the frames listed in ``no_face`` have no landmarks, as MediaPipe reports a frame
    where it finds no face."""
    image, landmarks = astronaut_with_landmarks()
    if flip:  # a second, different-looking avatar
        image = np.ascontiguousarray(image[:, :, ::-1])
    out_frames, out_lm = [], []
    for i in range(frames):
        dx = i * shift
        out_frames.append(np.roll(image, dx, axis=1))
        lm = landmarks.copy()
        lm[:, 0] += dx
        out_lm.append(lm if i not in no_face else np.full_like(lm, np.nan))
    return save_avatar(data_dir, name, np.stack(out_frames), np.stack(out_lm))


def speech_like(seconds: float, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    """Deterministic voiced sound with a syllable-rate envelope, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + seed), 0, None) ** 2
    sig = 0.3 * voiced * envelope + 0.01 * rng.standard_normal(t.size)
    return sig.astype(np.float32)
