"""The text-to-speech interface: text in, an async stream of ``Pcm`` (mono int16 at
``media.timing.SAMPLE_RATE``) out.

Backends are chosen by name (see ``tts.registry``). A backend yields audio sentence by
sentence, so speech can start as soon as the first sentence is ready.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from media.pcm import Pcm


class TTSError(RuntimeError):
    """Synthesis failed in a way the user should hear about (service unreachable, bad
    voice). The message says what went wrong and what to do."""


class TTSBackend(ABC):
    name: str = "base"

    @abstractmethod
    def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        """Yield ``Pcm`` chunks, in order, covering all of ``text``."""

    async def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing
        """Release what the backend holds (connections, threads); most hold nothing."""
