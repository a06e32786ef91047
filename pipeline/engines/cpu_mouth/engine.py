"""``CpuMouthEngine``: the engine interface over the feature stream, the rigs and the
painter. Everything that does not depend on the audio is worked out once in ``prepare``."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatars.avatar import Avatar, Frames
from pipeline.engines.base import Frame, LipSyncEngine, RenderItem

from .curves import F32
from .features import AnalysisConfig, MouthFeature, MouthFeatureStream
from .paint import PaintOptions, warp
from .rig import Rig, build_rig, smooth_landmarks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Prepared:
    frames: Frames  # (N, H, W, 3)
    rigs: list[Rig | None]
    xs: F32  # 0..W-1 as float32
    ys: F32  # 0..H-1 as float32


class CpuMouthEngine(LipSyncEngine[MouthFeature]):
    """Warps the lower face of the avatar's own frames; needs no weights.

    Options (constructor keywords):

    * ``max_open``: the jaw drop at full opening, as a fraction of the mouth width.
    * ``upper_lip``: how far the upper lip lifts, as a fraction of the jaw drop.
    * ``spread`` / ``pucker``: how far the corners move out for "ee" / in for "oo", as a
      fraction of half the mouth width.
    * ``teeth``: draw the hint of upper teeth in the opening.
    """

    name = "cpu"
    max_batch = 8

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        max_open: float = 0.3,
        upper_lip: float = 0.2,
        spread: float = 0.12,
        pucker: float = 0.3,
        teeth: bool = True,
        smooth_landmarks: float = 1.0,
        analysis: AnalysisConfig | None = None,
        **ignored: object,
    ) -> None:
        if ignored:
            # "auto" hands the same options to whichever engine it ends up with.
            log.info("cpu engine ignores options %s", ", ".join(sorted(ignored)))
        if not 0.0 < max_open <= 1.5:
            raise ValueError(f"max_open must be in (0, 1.5], got {max_open}")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.options = PaintOptions(
            max_open=float(max_open),
            upper_lip=float(upper_lip),
            spread=float(spread),
            pucker=float(pucker),
            teeth=bool(teeth),
        )
        self.smooth_landmarks = float(smooth_landmarks)
        self.analysis = analysis or AnalysisConfig()
        self._avatars: dict[str, _Prepared] = {}

    def prepare(self, avatar: Avatar) -> None:
        lm = smooth_landmarks(np.asarray(avatar.landmarks, np.float64), self.smooth_landmarks)
        opts = self.options
        rigs = [
            build_rig(lm[i], avatar.width, avatar.height, opts.max_open, opts.upper_lip, opts.spread)
            for i in range(avatar.num_frames)
        ]
        faces = sum(r is not None for r in rigs)
        if faces == 0:
            log.warning("avatar %s has no usable face: the cpu engine will show it unchanged", avatar.name)
        self._avatars[avatar.name] = _Prepared(
            frames=avatar.frames,
            rigs=rigs,
            xs=np.arange(avatar.width, dtype=np.float32),
            ys=np.arange(avatar.height, dtype=np.float32),
        )

    def new_stream(self) -> MouthFeatureStream:
        return MouthFeatureStream(self.analysis)

    def render(self, items: Sequence[RenderItem[MouthFeature]], outs: Sequence[Frame]) -> None:
        for item, out in zip(items, outs, strict=False):
            prep = self._avatars.get(item.avatar)
            if prep is None:
                raise KeyError(f"avatar {item.avatar!r} was not prepared")
            frame = prep.frames[item.avatar_index]
            np.copyto(out, frame)
            rig = prep.rigs[item.avatar_index]
            feature = item.feature
            # The type says MouthFeature; anything else still gets the plain frame.
            if rig is None or not isinstance(feature, MouthFeature):
                continue
            if feature.open < 1e-3 and abs(feature.width) < 1e-3:
                continue  # the rest pose is the frame itself
            warp(frame, out, rig, feature, self.options, prep.xs, prep.ys)
