"""Microsoft Edge's online neural voices through ``edge-tts``.

The service streams MP3; ``Mp3StreamDecoder`` turns it into 16 kHz PCM as the bytes
arrive, so the first sentence plays before the service has finished sending it. When
the service cannot be reached the backend fails fast with a TTSError that points at the
offline ``espeak`` backend.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator

import aiohttp
import av
import edge_tts
import numpy as np
from edge_tts.exceptions import EdgeTTSException

from media.pcm import Pcm
from media.timing import SAMPLE_RATE
from tts.base import TTSBackend, TTSError, VoiceCatalog, VoiceInfo
from tts.sentences import split_sentences

log = logging.getLogger(__name__)

_EMPTY: Pcm = np.zeros(0, np.int16)
_WORDY = re.compile(r"\w")  # a piece with no word character ("...", "?!") has nothing to say

# MPEG audio layer III tables (ISO 11172-3, 13818-3): kbit/s by bitrate index, Hz by
# sample-rate index; MPEG-2 and 2.5 share the second bitrate row.
_BITRATES = {
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_DECODER_DELAY = 529  # samples every MP3 decoder adds at the start (LAME's convention)


class Mp3StreamDecoder:
    """Decode an MP3 byte stream fed in arbitrary pieces to mono ``Pcm`` (int16).

    A leading ID3v2 tag is skipped. If the first frame is a Xing/Info frame with a LAME
    tag (written by LAME and FFmpeg), the encoder's delay and padding are trimmed, so the
    output lasts exactly as long as the audio that was encoded.
    """

    def __init__(self, rate: int = SAMPLE_RATE) -> None:
        self.rate = rate
        self._codec = av.CodecContext.create("mp3", "r")
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        self._head: bytearray | None = bytearray()  # held until the stream's start is known
        self._skip = 0  # output samples still to drop at the start
        self._end_trim = 0  # output samples to drop at the very end
        self._held = _EMPTY  # the last _end_trim samples, which may be padding

    def feed(self, data: bytes) -> Pcm:
        """Decode what ``data`` completes; return the PCM ready so far (maybe empty)."""
        if self._head is not None:
            self._head += data
            start = self._read_start(bytes(self._head))
            if start is None:
                return _EMPTY  # not enough bytes yet to tell
            data = bytes(self._head[start:])
            self._head = None
        return self._emit(self._decode(self._codec.parse(data)), final=False)

    def flush(self) -> Pcm:
        """Decode everything still buffered; the decoder is done afterwards."""
        pcm: list[np.ndarray] = []
        if self._head:  # a stream too short to have told us anything: decode it as is
            pcm.append(self._decode(self._codec.parse(bytes(self._head))))
        self._head = None
        pcm.append(self._decode(self._codec.parse(None)))
        pcm.append(self._decode([None]))
        pcm.append(self._resampled(None))
        return self._emit(np.concatenate(pcm), final=True)

    def _read_start(self, head: bytes) -> int | None:
        """Where the audio frames begin in ``head``; None if more bytes are needed."""
        at = 0
        if head[:3] == b"ID3":
            if len(head) < 10:
                return None
            size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            if head[5] & 0x10:  # footer present
                size += 10
            at = size
        if len(head) < at + 4:
            return None
        b1, b2, b3 = head[at + 1], head[at + 2], head[at + 3]
        version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
        bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
        if (
            head[at] != 0xFF
            or (b1 & 0xE0) != 0xE0
            or version == 1  # reserved
            or layer != 1  # not layer III
            or bitrate_index in (0, 15)
            or rate_index == 3
        ):
            return at  # not a frame we understand: let the parser find its way
        source_rate = _RATES[version][rate_index]
        kbps = _BITRATES[1 if version == 3 else 2][bitrate_index]
        frame_len = (144 if version == 3 else 72) * kbps * 1000 // source_rate + ((b2 >> 1) & 1)
        if len(head) < at + frame_len:
            return None
        mono = (b3 >> 6) == 3
        side_info = (17 if mono else 32) if version == 3 else (9 if mono else 17)
        tag = at + 4 + (0 if b1 & 1 else 2) + side_info  # 2: CRC when protected
        if head[tag : tag + 4] not in (b"Xing", b"Info"):
            return at
        self._read_lame_tag(head, tag, at + frame_len, source_rate)
        return at + frame_len  # the info frame holds no audio

    def _read_lame_tag(self, head: bytes, tag: int, end: int, source_rate: int) -> None:
        flags = int.from_bytes(head[tag + 4 : tag + 8], "big")
        # Optional fields: frame count, byte count, seek table, quality.
        lame = tag + 8 + sum(size for bit, size in ((1, 4), (2, 4), (4, 100), (8, 4)) if flags & bit)
        if lame + 24 > end or head[lame : lame + 4] not in (b"LAME", b"Lavf", b"Lavc"):
            return
        # 12 bits of encoder delay, 12 of padding, 21 bytes into the LAME tag.
        packed = int.from_bytes(head[lame + 21 : lame + 24], "big")
        delay, padding = packed >> 12, packed & 0xFFF
        scale = self.rate / source_rate
        self._skip = round((delay + _DECODER_DELAY) * scale)
        self._end_trim = round(max(padding - _DECODER_DELAY, 0) * scale)

    def _decode(self, packets: list[av.Packet] | list[None]) -> Pcm:
        out: list[np.ndarray] = []
        for packet in packets:
            try:
                frames = self._codec.decode(packet)
            except av.error.InvalidDataError:
                # A damaged frame: skip it, as players do, and keep going.
                log.debug("skipped an undecodable MP3 packet")
                continue
            out.extend(self._resampled(frame) for frame in frames)
        return np.concatenate(out) if out else _EMPTY

    def _resampled(self, frame: av.AudioFrame | None) -> Pcm:
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16, copy=False) if out else _EMPTY

    def _emit(self, pcm: Pcm, final: bool) -> Pcm:
        if self._skip:
            dropped = min(self._skip, pcm.size)
            pcm, self._skip = pcm[dropped:], self._skip - dropped
        if self._end_trim:
            pcm = np.concatenate([self._held, pcm])
            if final:
                return pcm[: max(pcm.size - self._end_trim, 0)]
            # Hold back what may turn out to be the padding at the end.
            split = max(pcm.size - self._end_trim, 0)
            pcm, self._held = pcm[:split], pcm[split:]
        return pcm


class EdgeTTSBackend(TTSBackend):
    """Neural voices from Microsoft Edge's read-aloud service (needs the internet)."""

    name = "edge"
    voice: str  # always set: the configured voice

    def __init__(
        self,
        voice: str = "en-US-AriaNeural",
        *,
        rate: str = "+0%",
        pitch: str = "+0Hz",
        volume: str = "+0%",
        proxy: str | None = None,
        connect_timeout: float = 5.0,
        first_audio_timeout: float = 10.0,
        receive_timeout: float = 20.0,
        list_timeout: float = 3.0,
    ) -> None:
        self.voice = voice
        self.rate = rate
        self.pitch = pitch
        self.volume = volume
        self.proxy = proxy
        self.connect_timeout = connect_timeout
        # edge-tts bounds only the socket connect and each read, not DNS, TLS or the
        # service's answer: these bound the whole wait for the first and next message.
        self.first_audio_timeout = first_audio_timeout
        self.receive_timeout = receive_timeout
        self.list_timeout = list_timeout
        self._catalog: VoiceCatalog | None = None  # the service's list, once it could be had

    async def voice_catalog(self) -> VoiceCatalog:
        """The service's voices (hundreds, in every language); it needs the network. Offline,
        or when the service does not answer within ``list_timeout``, the configured voice
        and a note saying why, at once rather than a hang."""
        if self._catalog is not None:
            return self._catalog
        try:
            found = await asyncio.wait_for(edge_tts.list_voices(proxy=self.proxy), self.list_timeout)
            voices = [VoiceInfo(v["ShortName"], v.get("FriendlyName") or v["ShortName"], v.get("Locale"),
                                str(v.get("Gender", "")).lower() or None) for v in found if v.get("ShortName")]
        except (aiohttp.ClientError, asyncio.TimeoutError, EdgeTTSException, OSError, KeyError, TypeError, ValueError) as exc:
            detail = type(exc).__name__  # the class says enough (DNS, connect, timeout); its text carries object reprs
            log.info("edge-tts voice list unavailable (%s: %s)", detail, exc)
            return VoiceCatalog(self.name, self.voice, [self._configured()], note=(
                f"the voice list needs Microsoft's online service, which did not answer ({detail}); "
                "any of its voice names (en-US-AriaNeural, de-DE-KatjaNeural, ...) is tried as sent"))
        if not voices:
            return VoiceCatalog(self.name, self.voice, [self._configured()], note="the service listed no voices")
        self._catalog = VoiceCatalog(self.name, self.voice, voices, complete=True)
        return self._catalog

    def _configured(self) -> VoiceInfo:
        locale = "-".join(self.voice.split("-")[:2]) if self.voice.count("-") >= 2 else None  # en-US-AriaNeural: en-US
        return VoiceInfo(self.voice, self.voice, locale)

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        for piece in split_sentences(text):
            if not _WORDY.search(piece):
                continue  # the service answers such a piece with no audio, an error
            # aclosing: an interrupted utterance closes the service connection at once.
            async with contextlib.aclosing(self._speak(piece, voice or self.voice)) as pcms:
                async for pcm in pcms:
                    yield pcm

    async def _speak(self, piece: str, voice: str) -> AsyncGenerator[Pcm, None]:
        try:
            communicate = edge_tts.Communicate(
                piece,
                voice,
                rate=self.rate,
                pitch=self.pitch,
                volume=self.volume,
                proxy=self.proxy,
                connect_timeout=max(1, round(self.connect_timeout)),
                receive_timeout=max(1, round(self.receive_timeout)),
            )
        except ValueError as exc:  # a malformed voice, rate, pitch or volume
            raise TTSError(f"edge-tts rejected its settings: {exc}") from exc
        decoder = Mp3StreamDecoder()
        messages = communicate.stream()
        timeout = self.first_audio_timeout
        try:
            while True:
                try:
                    message = await asyncio.wait_for(anext(messages), timeout)
                except StopAsyncIteration:
                    break
                timeout = self.receive_timeout
                if message["type"] == "audio":
                    pcm = decoder.feed(message["data"])
                    if pcm.size:
                        yield pcm
        except (aiohttp.ClientError, asyncio.TimeoutError, EdgeTTSException, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise TTSError(
                f"edge-tts could not reach its service ({detail}): check the network "
                "or use the offline 'espeak' backend"
            ) from exc
        finally:
            await messages.aclose()
        tail = decoder.flush()
        if tail.size:
            yield tail
