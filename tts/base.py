"""The text-to-speech interface: text in, an async stream of 16 kHz mono float32 PCM out.

Backends are chosen by name (see ``tts.registry``). A backend yields audio sentence by
sentence, so speech can start as soon as the first sentence is ready.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

import numpy as np

SAMPLE_RATE = 16_000


class TTSError(RuntimeError):
    """Synthesis failed in a way the user should hear about (service unreachable, bad
    voice). The message says what went wrong and what to do."""


class TTSBackend(ABC):
    name: str = "base"

    @abstractmethod
    def stream(self, text: str, voice: str | None = None) -> AsyncIterator[np.ndarray]:
        """Yield float32 mono PCM chunks at 16 kHz, in order, covering all of ``text``."""

    async def close(self) -> None:
        pass
