"""Lip-sync engines, chosen by name. Imports are lazy so the CPU engine never pulls torch."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from .base import EngineUnavailable, FeatureStream, LipSyncEngine, RenderItem

log = logging.getLogger(__name__)

ENGINES: dict[str, str] = {
    "cpu": "pipeline.engines.cpu_mouth:CpuMouthEngine",
    "musetalk": "pipeline.engines.musetalk:MuseTalkEngine",
}


def engine_names() -> list[str]:
    return [*ENGINES, "auto"]


def create_engine(name: str, data_dir: Path, **options: Any) -> LipSyncEngine:
    """Build the engine ``name``. ``auto`` takes MuseTalk when a GPU and its weights are
    there and the CPU engine otherwise, saying why in the log."""
    if name == "auto":
        try:
            return create_engine("musetalk", data_dir, **options)
        except EngineUnavailable as exc:
            log.warning("MuseTalk unavailable, using the CPU engine: %s", exc)
            return create_engine("cpu", data_dir, **options)
    # "package.module:Class" loads an engine from outside this project.
    target = ENGINES.get(name) or (name if ":" in name else None)
    if target is None:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(engine_names())} or give package.module:Class")
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(
            f"engine {name!r} needs packages that are not installed ({exc.name}): "
            f"pip install -e '.[{name}]'"
        ) from exc
    return getattr(module, cls_name)(data_dir=Path(data_dir), **options)


__all__ = ["EngineUnavailable", "FeatureStream", "LipSyncEngine", "RenderItem", "create_engine", "engine_names"]
