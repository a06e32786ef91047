"""The CPU engine: moves the jaw and lips of the avatar's own frame, driven by the speech.

No weights, no torch. Speech becomes one mouth pose per 40 ms frame (``features``); each
avatar frame's lower face is measured once from its landmarks (``rig``); a frame is drawn
by warping that lower face to the pose and painting the opening (``paint``);
``CpuMouthEngine`` (``engine``) wires them to the engine interface. ``curves`` holds the
smoothstep and polynomial they share.
"""
from __future__ import annotations

from .engine import CpuMouthEngine
from .features import AnalysisConfig, MouthFeature, MouthFeatureStream

__all__ = ["AnalysisConfig", "CpuMouthEngine", "MouthFeature", "MouthFeatureStream"]
