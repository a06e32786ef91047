"""Text-to-speech backends by name, imported only when asked for.

Lazy imports keep a missing optional dependency of one backend from breaking the others.
"""
from __future__ import annotations

import importlib
from typing import Any

from tts.base import TTSBackend, TTSError

TTS_BACKENDS: dict[str, str] = {
    "espeak": "tts.espeak:EspeakBackend",
    "edge": "tts.edge:EdgeTTSBackend",
    # any OpenAI-compatible /audio/speech: OpenAI, Kokoro-FastAPI, openedai-speech, LocalAI
    "openai": "tts.openai_speech:OpenAISpeechBackend",
    # neural voices offline; piper-tts is GPL-3.0, so an optional extra, never the default
    "piper": "tts.piper:PiperBackend",
}

# What to install when a backend's import fails.
_INSTALL_HINTS: dict[str, str] = {
    "espeak": "pip install espeakng-loader scipy",
    "edge": "pip install edge-tts av",
    "openai": "pip install aiohttp av",
    "piper": "pip install -e '.[piper]' (piper-tts, GPL-3.0, and the en_US-joe-medium voice package)",
}


def tts_names() -> list[str]:
    return list(TTS_BACKENDS)


def create_tts(name: str, **options: Any) -> TTSBackend:
    """Create the backend called ``name`` with its constructor's ``options``."""
    key = name.strip().lower()
    if key not in TTS_BACKENDS:
        raise ValueError(f"unknown TTS backend {name!r}; choose one of: {', '.join(TTS_BACKENDS)}")
    module_name, class_name = TTS_BACKENDS[key].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(key, "pip install realtime-lipsync")
        raise TTSError(f"TTS backend {key!r} cannot be imported ({exc}): {hint}") from exc
    backend_class: type[TTSBackend] = getattr(module, class_name)
    return backend_class(**options)
