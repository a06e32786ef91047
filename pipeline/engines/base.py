"""The lip-sync engine interface.

An engine turns a stream of speech into mouth motion on an avatar. The worker owns the
loop; an engine only answers three questions:

* ``prepare(avatar)``: once per avatar, before any frame of it is rendered (load or
  build and cache whatever the engine needs: landmarks, latents, masks).
* ``new_stream()``: a per-utterance audio-feature stream. PCM goes in as it arrives;
  per-frame features come out once the engine has the audio context it needs
  (look-ahead), so the worker never waits for a whole utterance.
* ``render(items, outs)``: one batch of frames, possibly from several sessions and
  avatars, each written as a full RGB frame straight into ``outs[i]`` (a view of a
  shared-memory slot).

An engine is generic in its feature type ``F``: what its stream emits is what its
``render`` takes, and nobody else looks inside.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from avatars.avatar import Avatar
from media.pcm import FloatPcm

F = TypeVar("F")

Frame = npt.NDArray[np.uint8]  # (H, W, 3) RGB


@dataclass(frozen=True)
class RenderItem(Generic[F]):
    avatar: str  # name of a prepared avatar
    avatar_index: int  # which avatar frame to draw on
    feature: F  # one element produced by the engine's FeatureStream


class FeatureStream(ABC, Generic[F]):
    """Per-utterance streaming audio features: float PCM in, one feature per 40 ms frame out."""

    @abstractmethod
    def push(self, pcm: FloatPcm) -> list[F]:
        """Add audio; return features for every frame whose audio context is now complete."""

    @abstractmethod
    def flush(self) -> list[F]:
        """The utterance ended: return the remaining frames' features (the last partial
        frame padded with silence, so no audio is left without a frame)."""


class LipSyncEngine(ABC, Generic[F]):
    name: str = "base"
    #: the largest batch ``render`` is asked to handle
    max_batch: int = 1

    @abstractmethod
    def prepare(self, avatar: Avatar) -> None:
        """Make ``avatar`` renderable. Called once per avatar in the worker."""

    @abstractmethod
    def new_stream(self) -> FeatureStream[F]:
        """A fresh feature stream for one utterance."""

    @abstractmethod
    def render(self, items: Sequence[RenderItem[F]], outs: Sequence[Frame]) -> None:
        """Render ``items[i]`` as a full frame into ``outs[i]`` (H, W, 3 uint8 RGB)."""

    def close(self) -> None:
        """Free what the engine holds (weights, device memory); engines with resources override."""


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (missing weights, missing extra, no GPU). The message
    says what is missing and how to get it."""
