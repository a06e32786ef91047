"""The lip-sync engine interface.

An engine turns a stream of speech into mouth motion on an avatar. The worker owns the
loop; an engine only answers four questions:

* ``prepare(avatar)``: once per avatar, before any frame of it is rendered (load or
  build and cache whatever the engine needs: landmarks, latents, masks).
* ``new_stream()``: a per-utterance feature stream. The worker pushes PCM into it as it
  arrives and pulls one feature per 40 ms frame when it is about to render that frame.
* ``features(wants)``: the next features of several streams at once, so an engine can
  batch the work of every speaking session (MuseTalk runs one Whisper pass for all).
* ``render(items, outs)``: one batch of frames, possibly from several sessions and
  avatars, each written as a full RGB frame straight into ``outs[i]`` (a view of a
  shared-memory slot).

Features are pulled, not pushed, so an engine computes a frame's features from all the
audio there is at the moment it is rendered: when an utterance's audio is complete
before its frames render (a TTS sentence, an upload, an offline job), what MuseTalk sees
is exactly what its own whole-utterance computation gives.

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
    """One utterance's audio features: float PCM pushed in as it arrives, one feature per
    40 ms frame pulled out in order. Every sample lands in a frame: after ``finish`` the
    stream has ``ceil(samples / 640)`` frames in all, the last partial one padded with silence."""

    @abstractmethod
    def push(self, pcm: FloatPcm) -> None:
        """Add audio (any length, any chunking: results do not depend on it)."""

    @abstractmethod
    def finish(self) -> None:
        """The utterance's audio is complete."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """``finish`` was called."""

    @abstractmethod
    def ready(self) -> int:
        """Frames whose features can be taken now: their audio context has arrived (all of
        the rest, once finished)."""

    @abstractmethod
    def take(self, n: int) -> list[F]:
        """The next ``n`` frames' features (``n <= ready()``), computed from all the audio
        pushed so far."""


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

    def features(self, wants: Sequence[tuple[FeatureStream[F], int]]) -> list[list[F]]:
        """``stream.take(n)`` for each ``(stream, n)``; engines override it to do the work
        of all the streams in one go."""
        return [stream.take(n) for stream, n in wants]

    @abstractmethod
    def render(self, items: Sequence[RenderItem[F]], outs: Sequence[Frame]) -> None:
        """Render ``items[i]`` as a full frame into ``outs[i]`` (H, W, 3 uint8 RGB)."""

    def close(self) -> None:
        """Free what the engine holds (weights, device memory); engines with resources override."""


class EngineUnavailable(RuntimeError):
    """The engine cannot run here (missing weights, missing extra, no GPU). The message
    says what is missing and how to get it."""


def whole_utterance(engine: LipSyncEngine[F], pcm: FloatPcm) -> list[F]:
    """Every frame's features of one complete utterance (offline use, tests, benchmarks)."""
    stream = engine.new_stream()
    stream.push(pcm)
    stream.finish()
    (features,) = engine.features([(stream, stream.ready())])
    return features
