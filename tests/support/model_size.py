"""Counting a model's parameters without allocating it (on the meta device)."""
from __future__ import annotations

from typing import Any

from models.unet import MUSETALK_UNET_CONFIG, build_unet


def count_parameters(config: dict[str, Any] | None = None) -> int:
    """Parameters of the MuseTalk UNet built from ``config`` (the real one by default)."""
    model = build_unet(config or MUSETALK_UNET_CONFIG, "meta")
    return sum(p.numel() for p in model.parameters())
