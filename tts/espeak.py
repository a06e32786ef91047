"""espeak-ng through ctypes: the offline default backend.

libespeak-ng keeps its state in globals and is not thread-safe, so the process has ONE
engine that owns the library and calls it from ONE dedicated thread; every backend
instance shares it. The library comes from the ``espeakng-loader`` wheel (library and
voice data in one pip package), falling back to a system libespeak-ng (Debian's
``libespeak-ng1``). Synthesis runs far faster than real time, so each sentence is
synthesised whole and yielded as one chunk.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import difflib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from scipy.signal import resample_poly

from media.pcm import Pcm, from_float, silence, to_float
from tts.base import TTSBackend, TTSError, VoiceCatalog, VoiceInfo
from tts.sentences import split_sentences

log = logging.getLogger(__name__)

T = TypeVar("T")

# From speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # add the pause espeak itself puts after a sentence
_RATE = 1
_PITCH = 3
_EE_OK = 0
_GENDERS = {1: "male", 2: "female"}
_RATE_RANGE = (80, 450)  # words per minute espeak accepts
_PITCH_RANGE = (0, 100)

ESPEAK_RATE = 22_050  # what espeak-ng's voices produce; the engine checks it
MAX_TEXT_CHARS = 5000
_LEAD_KEEP_S = 0.005  # of the first sentence's leading silence, keep this much
_SILENCE = 100  # int16 level below which a sample counts as silence

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # not NUL-terminated: see language_table
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


def _open_library() -> tuple[ctypes.CDLL, str | None]:
    """The library and its data directory (None: the library's own default)."""
    problems: list[str] = []
    try:
        import espeakng_loader

        return ctypes.CDLL(espeakng_loader.get_library_path()), espeakng_loader.get_data_path()
    except (ImportError, OSError, RuntimeError) as exc:
        problems.append(f"espeakng-loader: {exc}")
    system = ctypes.util.find_library("espeak-ng")
    if system is not None:
        try:
            return ctypes.CDLL(system), None
        except OSError as exc:
            problems.append(f"{system}: {exc}")
    else:
        problems.append("no system libespeak-ng")
    raise TTSError(
        "espeak-ng could not be loaded (" + "; ".join(problems) + "): "
        "run `pip install espeakng-loader`, or install the system library "
        "(Debian/Ubuntu: `apt install libespeak-ng1`)"
    )


class _EspeakEngine:
    """The process's libespeak-ng. Every method except ``call`` runs on its thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        self._lib: ctypes.CDLL | None = None
        self._samples: list[np.ndarray] = []
        # ctypes frees a callback whose Python object dies: the engine holds it.
        self._callback = _SynthCallback(self._on_samples)
        self._voice: str | None = None

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def call_blocking(self, fn: Callable[..., T], *args: object) -> T:
        return self._executor.submit(fn, *args).result()

    def load(self) -> ctypes.CDLL:
        if self._lib is not None:
            return self._lib
        lib, data_path = _open_library()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        path = data_path.encode() if data_path is not None else None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, path, _INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise TTSError(
                f"espeak-ng failed to initialise (returned {rate}, data {data_path or 'default'}): "
                "reinstall with `pip install --force-reinstall espeakng-loader`"
            )
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        log.info("espeak-ng loaded (data: %s)", data_path or "library default")
        return lib

    def _on_samples(self, wav: ctypes.Array | None, count: int, _events: int | None) -> int:
        # Called from inside espeak_Synth, on the engine thread. wav is NULL at the end.
        if wav and count > 0:
            self._samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # 0: go on

    def language_table(self) -> dict[str, str]:
        """Language code (lower case) -> identifier of the voice that speaks it best."""
        return {lang: identifier for lang, (identifier, _name, _gender) in self.voice_table().items()}

    def voice_table(self) -> dict[str, tuple[str, str, int]]:
        """Language code (lower case) -> (identifier, name, gender: 0 none, 1 male, 2 female)
        of the voice that speaks it best."""
        lib = self.load()
        voices = lib.espeak_ListVoices(None)
        best: dict[str, tuple[int, str, str, int]] = {}
        i = 0
        while voices[i]:
            voice = voices[i].contents
            identifier = voice.identifier.decode("utf-8", "replace")
            name = (voice.name or b"").decode("utf-8", "replace")
            # ``languages`` is a run of [priority byte][name][NUL], ended by a 0 byte;
            # a lower priority number is a better match.
            at = voice.languages
            while at and (priority := ctypes.string_at(at, 1)[0]) != 0:
                code = ctypes.string_at(at + 1)
                at += len(code) + 2
                lang = code.decode("utf-8", "replace").lower()
                if lang not in best or priority < best[lang][0]:
                    best[lang] = (priority, identifier, name, int(voice.gender))
            i += 1
        return {lang: (identifier, name, gender) for lang, (_, identifier, name, gender) in best.items()}

    def set_voice(self, voice: str) -> None:
        lib = self.load()
        if voice == self._voice:
            return
        ok = lib.espeak_SetVoiceByName(voice.encode("utf-8")) == _EE_OK
        if not ok:
            # espeak matches voice names and files, not language codes such as "en-gb":
            # map the code to the voice that speaks it, keeping any "+variant".
            base, plus, variant = voice.partition("+")
            identifier = self.language_table().get(base.strip().lower())
            if identifier is not None:
                ok = lib.espeak_SetVoiceByName(f"{identifier}{plus}{variant}".encode()) == _EE_OK
        if not ok:
            self._voice = None  # espeak may have half-loaded something: set it again next time
            codes = list(self.language_table())
            close = difflib.get_close_matches(voice.lower(), codes, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise TTSError(
                f"espeak-ng has no voice {voice!r}.{hint} Voices are language codes such as "
                "en-us, en-gb, fr-fr, de, es, cmn (with an optional variant: en-us+f3); "
                "`python -c \"from tts.espeak import EspeakBackend; "
                "print(EspeakBackend().voices())\"` lists them all."
            )
        self._voice = voice

    def synthesize(
        self, text: str, voice: str, rate: int, pitch: int, trim_lead: bool, end_pause: bool
    ) -> Pcm:
        """One piece of text to ``Pcm`` at SAMPLE_RATE."""
        lib = self.load()
        self.set_voice(voice)
        # Set every time: loading a voice may reset them.
        lib.espeak_SetParameter(_RATE, rate, 0)
        lib.espeak_SetParameter(_PITCH, pitch, 0)
        data = text.encode("utf-8") + b"\0"
        self._samples = []
        flags = _CHARS_UTF8 | (_ENDPAUSE if end_pause else 0)
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
        samples, self._samples = self._samples, []
        if err != _EE_OK:
            raise TTSError(f"espeak-ng failed to synthesise {text[:40]!r} (error {err})")
        if not samples:
            return silence(0)
        pcm = np.concatenate(samples)
        if trim_lead:
            loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > _SILENCE)
            keep = int(_LEAD_KEEP_S * ESPEAK_RATE)
            pcm = pcm[max(int(loud[0]) - keep, 0) :] if loud.size else pcm[:0]
        # 16000/22050 = 320/441, filtered in float, back to the project's samples.
        return from_float(resample_poly(to_float(pcm), 320, 441))


@functools.cache
def _shared_engine() -> _EspeakEngine:
    # One per process because the library's state is process-wide.
    return _EspeakEngine()


class EspeakBackend(TTSBackend):
    """Offline speech from espeak-ng: robotic but instant, and needs nothing online."""

    name = "espeak"
    voice: str  # always set: the configured voice

    def __init__(self, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> None:
        for label, value, (low, high) in (
            ("rate", rate, _RATE_RANGE),
            ("pitch", pitch, _PITCH_RANGE),
        ):
            if not low <= value <= high:
                raise TTSError(f"espeak {label} must be between {low} and {high}, got {value}")
        self.voice = voice
        self.rate = rate
        self.pitch = pitch
        self._catalog: VoiceCatalog | None = None  # the installed voices do not change: listed once
        self._names: set[str] = set()
        self._engine = _shared_engine()
        # Fail at creation, not at the first utterance, when the library or voice is missing.
        self._engine.call_blocking(self._engine.set_voice, voice)

    def voices(self) -> list[str]:
        """The language codes espeak-ng accepts as ``voice``."""
        return sorted(self._engine.call_blocking(self._engine.language_table))

    async def voice_catalog(self) -> VoiceCatalog:
        """espeak-ng's installed voices, one per language code (what ``voice`` takes; a
        ``+variant`` such as ``en-us+f3`` may follow any of them)."""
        if self._catalog is None:
            table = await self._engine.call(self._engine.voice_table)
            voices = [VoiceInfo(code, name.replace("_", " ") or code, code, _GENDERS.get(gender))
                      for code, (_identifier, name, gender) in sorted(table.items())]
            self._names = {identifier.lower() for identifier, _n, _g in table.values()} | {
                name.lower() for _i, name, _g in table.values()}
            self._catalog = VoiceCatalog(self.name, self.voice, voices, complete=True,
                                         note="any voice may take a variant: en-us+f3, en-us+m2, ...")
        return self._catalog

    async def check_voice(self, voice: str) -> str | None:
        catalog = await self.voice_catalog()
        base = voice.partition("+")[0].strip()
        if base.lower() in self._names:  # a voice's name or file ("gmw/en-US") works as well as its code
            return None
        return catalog.unknown(base)

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        if len(text) > MAX_TEXT_CHARS:
            raise TTSError(
                f"text too long for one utterance ({len(text)} characters, at most "
                f"{MAX_TEXT_CHARS}): send it in parts"
            )
        pieces = split_sentences(text)
        for i, piece in enumerate(pieces):
            pcm = await self._engine.call(
                self._engine.synthesize,
                piece,
                voice or self.voice,
                self.rate,
                self.pitch,
                i == 0,  # trim the first piece's leading silence: speech starts sooner
                i < len(pieces) - 1,  # a natural pause between pieces, none after the last
            )
            if pcm.size:
                yield pcm
