"""The text-to-speech interface: text in, an async stream of ``Pcm`` (mono int16 at
``media.timing.SAMPLE_RATE``) out.

Backends are chosen by name (see ``tts.registry``). A backend yields audio sentence by
sentence, so speech can start as soon as the first sentence is ready.
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from media.pcm import Pcm

SHOWN_VOICES = 8  # voices an "unknown voice" message names


class TTSError(RuntimeError):
    """Synthesis failed in a way the user should hear about (service unreachable, bad
    voice). The message says what went wrong and what to do."""


@dataclass(frozen=True)
class VoiceInfo:
    """One voice a backend offers: ``id`` is what ``voice`` takes."""

    id: str
    name: str
    language: str | None = None
    gender: str | None = None  # "female", "male"; None when the backend does not say

    def json(self) -> dict[str, str]:
        out = {"id": self.id, "name": self.name}
        if self.language:
            out["language"] = self.language
        if self.gender:
            out["gender"] = self.gender
        return out


@dataclass(frozen=True)
class VoiceCatalog:
    """What a backend offers. ``complete``: every voice it takes is listed, so any other is
    refused up front; otherwise the list is what is known (the configured voice, say) and
    ``note`` says why."""

    backend: str
    default: str | None
    voices: list[VoiceInfo] = field(default_factory=list)
    complete: bool = False
    note: str | None = None

    def json(self) -> dict[str, object]:
        out: dict[str, object] = {"backend": self.backend, "default": self.default,
                                  "voices": [v.json() for v in self.voices], "complete": self.complete}
        if self.note:
            out["note"] = self.note
        return out

    def unknown(self, voice: str) -> str | None:
        """Why ``voice`` is refused, naming a few that exist; None when it is listed, or when
        the catalog cannot tell (not ``complete``)."""
        ids = [v.id for v in self.voices]
        if not self.complete or voice.lower() in {i.lower() for i in ids}:
            return None
        close = difflib.get_close_matches(voice, ids, n=SHOWN_VOICES, cutoff=0.5)
        shown = (close + [i for i in ids if i not in close])[:SHOWN_VOICES]  # the closest first
        more = f" ({len(ids)} in all: GET /voices lists them)" if len(ids) > len(shown) else ""
        return f"the {self.backend} backend has no voice {voice!r}; try {', '.join(shown)}{more}"


class TTSBackend(ABC):
    name: str = "base"
    voice: str | None = None  # the voice used when an utterance names none

    @abstractmethod
    def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        """Yield ``Pcm`` chunks, in order, covering all of ``text``."""

    async def voice_catalog(self) -> VoiceCatalog:
        """The voices this backend offers (``GET /voices``). Never waits long: a backend whose
        list is online answers what it knows when the list cannot be had."""
        voices = [VoiceInfo(self.voice, self.voice)] if self.voice else []
        return VoiceCatalog(self.name, self.voice, voices, note="this backend does not list its voices")

    async def check_voice(self, voice: str) -> str | None:
        """Why ``voice`` cannot be used (naming some that can), or None when it can or the
        backend cannot tell before trying."""
        return (await self.voice_catalog()).unknown(voice)

    async def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold nothing
        """Release what the backend holds (connections, threads); most hold nothing."""
