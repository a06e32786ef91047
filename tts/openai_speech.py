"""Speech from any OpenAI-compatible ``/audio/speech`` endpoint: OpenAI itself and the
local servers that copy its API (Kokoro-FastAPI, openedai-speech, LocalAI...).

Each sentence is one request, so speech starts as soon as the first sentence is
synthesised; each response body is streamed and resampled to 16 kHz as it arrives.
``pcm`` is OpenAI's raw s16le mono at 24 kHz (``pcm_rate`` for servers that send another
rate); ``wav`` carries its own rate and format, so it is the safe choice for a server
whose raw rate is unknown.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import numpy as np
from yarl import URL

from media.pcm import Pcm, from_float, saturate
from media.resample import StreamResampler
from tts.base import TTSBackend, TTSError, VoiceCatalog, VoiceInfo
from tts.sentences import split_sentences

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOST = "api.openai.com"
# The voices OpenAI's speech models take; the list has no endpoint of its own.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
OPENAI_PCM_RATE = 24_000
RESPONSE_FORMATS = ("pcm", "wav")
SPEED_RANGE = (0.25, 4.0)  # what OpenAI accepts
VOICES_KEPT_S = 60.0  # a server's voice list is asked again after this

_EMPTY: Pcm = np.zeros(0, np.int16)
_WORDY = re.compile(r"\w")  # a piece with no word character ("...") has nothing to say
_MAX_ERROR_BODY = 64 * 1024
_MAX_WAV_HEADER = 1 << 20  # a header this long is not a header


def server_error_message(body: str, limit: int = 300) -> str:
    """The human part of an error body from an OpenAI-compatible server: OpenAI's
    ``{"error": {"message"}}``, Ollama's ``{"error": "..."}``, FastAPI's ``{"detail": ...}``
    (Kokoro-FastAPI, vLLM), or the text itself, shortened to ``limit`` characters."""
    text = body.strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("error") or value.get("msg")
            elif isinstance(value, list) and value and isinstance(value[0], dict):  # FastAPI validation errors
                value = "; ".join(str(item.get("msg", item)) for item in value)
            if value:
                message = value
                break
    message = str(message) if message else text
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


async def read_error_body(response: aiohttp.ClientResponse) -> str:
    """The start of an error response's body, or "" when it cannot be read."""
    try:
        raw = await asyncio.wait_for(response.content.read(_MAX_ERROR_BODY), 5.0)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return ""
    return raw.decode("utf-8", "replace")


def check_base_url(base_url: str, what: str) -> URL:
    url = URL(str(base_url).strip().rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{what} base_url must be an http(s) URL such as http://127.0.0.1:8880/v1, got {base_url!r}")
    return url


class RawPcmDecoder(StreamResampler):
    """Raw s16le mono at ``rate`` (OpenAI's ``pcm``) in byte pieces of any size."""

    def __init__(self, rate: int = OPENAI_PCM_RATE) -> None:
        super().__init__(rate, 1)


class WavStreamDecoder:
    """A WAV file streamed in byte pieces: 16-bit integer or 32-bit float PCM, any rate
    and channel count (mixed to mono). Streaming servers write an unknown data size
    (0 or 0xFFFFFFFF): then the data runs to the end of the body."""

    def __init__(self) -> None:
        self._head: bytearray | None = bytearray()
        self._dtype: np.dtype[Any] = np.dtype("<i2")
        self._channels = 1
        self._left: int | None = None  # data bytes still expected; None: until the end
        self._carry = b""  # a partial sample frame
        self._resampler: StreamResampler | None = None

    def feed(self, data: bytes) -> Pcm:
        if self._head is not None:
            self._head += data
            if len(self._head) > _MAX_WAV_HEADER:
                raise TTSError("the speech server's WAV has no audio data in its first megabyte")
            if not self._read_header():
                return _EMPTY
            data, self._head = bytes(self._head), None
        if self._left is not None:
            data, self._left = data[: self._left], max(self._left - len(data), 0)
        return self._decode(data)

    def flush(self) -> Pcm:
        if self._head is not None:
            if self._head:
                raise TTSError(f"the speech server's answer is not a complete WAV file (starts {bytes(self._head[:12])!r})")
            return _EMPTY
        return self._resampler.flush() if self._resampler is not None else _EMPTY

    def _read_header(self) -> bool:
        """Parse up to the data chunk; leave only sample bytes in ``_head``. False: more needed."""
        head = self._head
        assert head is not None
        if len(head) < 12:
            return False
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise TTSError(f"the speech server's answer is not WAV (starts {bytes(head[:12])!r}): try response_format=pcm")
        at = 12
        rate = 0
        while True:
            if len(head) < at + 8:
                return False
            chunk, size = bytes(head[at : at + 4]), struct.unpack_from("<I", head, at + 4)[0]
            body = at + 8
            if chunk == b"data":
                if not rate:
                    raise TTSError("the speech server's WAV has its audio before its format chunk")
                self._left = None if size in (0, 0xFFFFFFFF) else size
                del head[:body]
                self._resampler = StreamResampler(rate)
                return True
            if len(head) < body + size:
                return False
            if chunk == b"fmt ":
                rate = self._read_format(bytes(head[body : body + size]))
            at = body + size + (size & 1)  # chunks are padded to even sizes

    def _read_format(self, fmt: bytes) -> int:
        if len(fmt) < 16:
            raise TTSError("the speech server's WAV has a truncated format chunk")
        tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
        if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
            tag = struct.unpack_from("<H", fmt, 24)[0]
        if (tag, bits) == (1, 16):
            self._dtype = np.dtype("<i2")
        elif (tag, bits) == (3, 32):
            self._dtype = np.dtype("<f4")
        else:
            raise TTSError(f"the speech server's WAV is format {tag} with {bits}-bit samples; 16-bit PCM or 32-bit float expected")
        if channels < 1 or rate < 1:
            raise TTSError(f"the speech server's WAV says {channels} channels at {rate} Hz")
        self._channels = channels
        return int(rate)

    def _decode(self, data: bytes) -> Pcm:
        assert self._resampler is not None
        frame_bytes = self._dtype.itemsize * self._channels
        data = self._carry + data
        whole = len(data) - len(data) % frame_bytes
        self._carry = data[whole:]
        samples = np.frombuffer(data[:whole], self._dtype).reshape(-1, self._channels)
        mono = samples.mean(axis=1) if self._channels > 1 else samples[:, 0]
        if self._dtype.kind == "f":
            pcm = from_float(mono)
        elif self._channels > 1:
            pcm = saturate(mono.astype(np.float32))  # the mean of the channels, in int16 units
        else:
            pcm = mono.astype(np.int16)
        return self._resampler.feed(pcm.tobytes())


class OpenAISpeechBackend(TTSBackend):
    """Voices from an OpenAI-compatible speech endpoint (``POST {base_url}/audio/speech``)."""

    name = "openai"
    voice: str  # always set: the configured voice

    def __init__(
        self,
        base_url: str = OPENAI_BASE_URL,
        api_key: str | None = None,
        model: str = "tts-1",
        voice: str = "alloy",
        response_format: str = "pcm",
        speed: float = 1.0,
        *,
        pcm_rate: int = OPENAI_PCM_RATE,
        instructions: str | None = None,
        connect_timeout: float = 5.0,
        first_audio_timeout: float = 30.0,
        receive_timeout: float = 20.0,
    ) -> None:
        try:
            self._url = check_base_url(base_url, "openai TTS")
        except ValueError as exc:
            raise TTSError(str(exc)) from exc
        self.base_url = str(self._url)
        # Options arrive parsed from KEY=VALUE: a numeric key or model name comes in as a number.
        self.model = str(model)
        self.voice = str(voice)
        self.response_format = str(response_format).lower()
        if self.response_format not in RESPONSE_FORMATS:
            raise TTSError(f"openai TTS response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
        low, high = SPEED_RANGE
        if not low <= float(speed) <= high:
            raise TTSError(f"openai TTS speed must be between {low} and {high}, got {speed}")
        self.speed = float(speed)
        if int(pcm_rate) < 1000:
            raise TTSError(f"openai TTS pcm_rate must be a sample rate in Hz, got {pcm_rate}")
        self.pcm_rate = int(pcm_rate)
        self.instructions = instructions
        # OpenAI's key from the environment, but only for OpenAI: never sent to another server.
        if api_key is None and self._url.host == OPENAI_HOST:
            api_key = os.environ.get("OPENAI_API_KEY")
        self._api_key = None if api_key in (None, "") else str(api_key)
        self.connect_timeout = float(connect_timeout)
        self.first_audio_timeout = float(first_audio_timeout)
        self.receive_timeout = float(receive_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._catalog: tuple[float, VoiceCatalog] | None = None  # (loop time, catalog)

    def __repr__(self) -> str:  # the key stays out of logs
        return f"OpenAISpeechBackend(base_url={self.base_url!r}, model={self.model!r}, voice={self.voice!r})"

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        for piece in split_sentences(text):
            if not _WORDY.search(piece):
                continue
            # aclosing: an interrupted utterance drops the connection at once, so the
            # server stops synthesising.
            async with contextlib.aclosing(self._speak(piece, voice or self.voice)) as pcms:
                async for pcm in pcms:
                    yield pcm

    async def voices(self) -> list[str]:
        """The voices the server offers: OpenAI's fixed list, the server's
        ``GET {base_url}/audio/voices`` (Kokoro-FastAPI has one), else the configured voice."""
        return await self._voice_names() or [self.voice]

    async def voice_catalog(self) -> VoiceCatalog:
        """``voices`` as a catalog: complete when the server (or OpenAI's fixed list) named
        them, so an unknown voice is refused before a sentence is sent. Kept for a minute."""
        loop = asyncio.get_running_loop()
        if self._catalog is not None and loop.time() - self._catalog[0] < VOICES_KEPT_S:
            return self._catalog[1]
        names = await self._voice_names()
        if names:
            catalog = VoiceCatalog(self.name, self.voice, [VoiceInfo(n, n) for n in names], complete=True)
        else:
            catalog = VoiceCatalog(self.name, self.voice, [VoiceInfo(self.voice, self.voice)],
                                   note=f"{self.base_url} lists no voices (no /audio/voices): any voice name is tried as sent")
        self._catalog = (loop.time(), catalog)
        return catalog

    async def _voice_names(self) -> list[str]:
        """The names the server lists; [] when it lists none or cannot be asked."""
        if self._url.host == OPENAI_HOST:
            return list(OPENAI_VOICES)
        url = f"{self.base_url}/audio/voices"
        try:
            async with self._client().get(
                url, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=self.connect_timeout + 5.0)
            ) as response:
                if response.status == 200:
                    found = _voice_names(await response.json(content_type=None))
                    if found:
                        return found
                log.info("%s answered %s with no voice list; offering the configured voice", url, response.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.info("no voice list from %s (%s); offering the configured voice", url, type(exc).__name__)
        return []

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout)
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _speak(self, piece: str, voice: str) -> AsyncGenerator[Pcm, None]:
        url = f"{self.base_url}/audio/speech"
        body: dict[str, Any] = {
            "model": self.model,
            "input": piece,
            "voice": voice,
            "response_format": self.response_format,
            "speed": self.speed,
        }
        if self.instructions:
            body["instructions"] = self.instructions
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_audio_timeout
        try:
            response = await asyncio.wait_for(self._post(url, body), self.first_audio_timeout)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            # Also aiohttp's connect timeout (a TimeoutError and a ClientError); the plain
            # TimeoutError of wait_for is a server that connected but never answered.
            if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ClientError):
                raise self._silent() from exc
            raise self._unreachable(exc) from exc
        finished = False
        try:
            if response.status >= 400:
                detail = server_error_message(await read_error_body(response))
                raise TTSError(
                    f"the speech server answered {response.status} {response.reason or ''} for voice {voice!r}, "
                    f"model {self.model!r}: {detail or 'no detail'}{_hint(response.status)}"
                )
            if response.content_type.startswith("text/") or response.content_type == "application/json":
                detail = server_error_message(await read_error_body(response))
                raise TTSError(f"the speech server sent {response.content_type}, not audio: {detail}")
            decoder = RawPcmDecoder(self.pcm_rate) if self.response_format == "pcm" else WavStreamDecoder()
            first = True
            while True:
                wait = deadline - loop.time() if first else self.receive_timeout
                try:
                    data = await asyncio.wait_for(response.content.readany(), max(wait, 0.0))
                except asyncio.TimeoutError as exc:
                    raise self._silent() if first else TTSError(
                        f"the speech server stopped sending audio for {self.receive_timeout:g} s mid-sentence"
                    ) from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise TTSError(f"the speech server's audio stream broke off ({type(exc).__name__}: {exc})") from exc
                if not data:
                    break
                first = False
                pcm = decoder.feed(data)
                if pcm.size:
                    yield pcm
            tail = decoder.flush()
            if tail.size:
                yield tail
            finished = True
        finally:
            # Not read to the end (interrupted, failed): drop the connection rather than
            # return it to the pool, which also tells the server to stop.
            if finished:
                response.release()
            else:
                response.close()

    async def _post(self, url: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        return await self._client().post(url, json=body, headers=self._headers())

    def _unreachable(self, exc: BaseException) -> TTSError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return TTSError(
            f"the speech server at {self.base_url} cannot be reached ({detail}): is it running? "
            "Or use the offline 'espeak' backend"
        )

    def _silent(self) -> TTSError:
        return TTSError(
            f"the speech server at {self.base_url} sent no audio within {self.first_audio_timeout:g} s: "
            "it is overloaded or stuck; raise first_audio_timeout or use the offline 'espeak' backend"
        )


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check the api_key option)"
    if status == 404:
        return " (check base_url, which usually ends in /v1, and the model and voice names)"
    if status == 429:
        return " (rate limited or out of quota)"
    return ""


def _voice_names(data: Any) -> list[str]:
    """Voice names from the shapes servers answer with: a list, or ``{"voices": [...]}`` /
    ``{"data": [...]}``, of names or of objects with an id or name."""
    if isinstance(data, dict):
        data = data.get("voices", data.get("data"))
    if not isinstance(data, list):
        return []
    names: list[str] = []
    for item in data:
        if isinstance(item, dict):
            item = item.get("id") or item.get("voice_id") or item.get("name")
        if isinstance(item, str) and item:
            names.append(item)
    return names
