"""The MuseTalk engine: Whisper features, one UNet step, VAE decode, paste-back on the GPU.

``engine`` is the engine itself (options, device and dtype choice, loading the weights,
batched rendering); ``material`` what it needs per avatar frame (face box, latent,
blending mask), built once and cached with the avatar; ``timer`` the per-stage timing
the benchmark reads. The networks and their weight files live in ``models``.
"""
from __future__ import annotations

from .engine import MuseTalkEngine, MuseTalkModels, MuseTalkOptions, pick_device, pick_dtype
from .material import MaterialParams, MuseTalkMaterial
from .timer import StageTimer

__all__ = [
    "MaterialParams",
    "MuseTalkEngine",
    "MuseTalkMaterial",
    "MuseTalkModels",
    "MuseTalkOptions",
    "StageTimer",
    "pick_device",
    "pick_dtype",
]
