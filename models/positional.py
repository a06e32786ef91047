"""MuseTalk's sinusoidal positional encoding over the 50 audio tokens of a frame.

Added to the 10 x 5 Whisper states (flattened to 50 x 384) before they enter the UNet's
cross-attention; the table is the Transformer one (sin on even channels, cos on odd),
as in the reference ``PositionalEncoding(d_model=384)``.
"""
from __future__ import annotations

import math

import torch

D_MODEL = 384
TOKENS = 50  # 10 Whisper steps x 5 hidden states


def sinusoid_table(length: int = TOKENS, d_model: int = D_MODEL) -> torch.Tensor:
    """(length, d_model) float32: pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(...)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe

