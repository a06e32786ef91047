"""Reading state dicts from the checkpoint formats the MuseTalk weights ship in.

``torch.save`` files (``.bin``, ``.pth``, ``.pt``) are read with ``weights_only=True``
(no arbitrary pickled code) and memory-mapped when they are zip archives, so a 3.4 GB
UNet is not held twice in RAM; ``.safetensors`` through safetensors.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .weights import WeightsError


class CheckpointError(WeightsError):
    """The file exists but does not hold the expected weights."""


def load_state_dict(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # legacy (non-zip) torch.save files cannot be memory-mapped
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({exc})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``module.`` from DataParallel) when every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def assign_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path | str) -> None:
    """Load ``state`` into ``model`` (built on the meta device), strictly, adopting the
    checkpoint's tensors instead of copying them. Raises CheckpointError naming the
    first mismatching keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} of the wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise CheckpointError(f"{path} is not a {what} checkpoint: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{what}: tensors not in the checkpoint and not computable: {', '.join(leftover[:3])}")
