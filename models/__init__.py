"""The neural networks behind the MuseTalk engine and their weight files.

* ``weights``  - file layout, what each version needs, the start-up check (no torch)
* ``download`` - ``python -m models download``: resumable, verified fetches
* ``unet``, ``vae``, ``whisper``, ``positional``, ``face_parsing`` - the models,
  loaded from the real checkpoint formats (torch imported there, not here)
"""
from __future__ import annotations

from .weights import (
    DEFAULT_VERSION,
    VERSIONS,
    MissingWeights,
    WeightProblem,
    WeightsError,
    WeightSpec,
    check_weights,
    download_command,
    models_dir,
    require_weights,
)

__all__ = [
    "DEFAULT_VERSION",
    "VERSIONS",
    "MissingWeights",
    "WeightProblem",
    "WeightSpec",
    "WeightsError",
    "check_weights",
    "download_command",
    "models_dir",
    "require_weights",
]
