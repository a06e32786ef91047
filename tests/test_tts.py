"""The tts package: sentence splitting, espeak-ng synthesis, MP3 stream decoding, the
edge-tts backend's failure and streaming paths, and the registry. Nothing here needs the
internet: the edge backend is pointed at a closed local port or given a fake service."""
from __future__ import annotations

import asyncio
import ctypes.util
import io
import logging
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import av
import numpy as np
import pytest
from scipy.signal import welch

import tts
import tts.edge
import tts.espeak
from media.pcm import Pcm, to_float
from media.timing import SAMPLE_RATE
from tts import TTSError, create_tts, tts_names
from tts.edge import EdgeTTSBackend, Mp3StreamDecoder
from tts.espeak import MAX_TEXT_CHARS, EspeakBackend
from tts.registry import TTS_BACKENDS
from tts.sentences import split_sentences

log = logging.getLogger(__name__)

THREE_SENTENCES = (
    "Hello there, this is the first sentence. Here is a second one! "
    "And a third, final sentence?"
)


async def collect(stream: AsyncIterator[Pcm]) -> list[Pcm]:
    return [chunk async for chunk in stream]


async def collect_float(stream: AsyncIterator[Pcm]) -> list[np.ndarray]:
    """The chunks as float in -1..1, for measuring levels."""
    return [to_float(chunk) for chunk in await collect(stream)]


def dominant_hz(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(pcm))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[np.argmax(spectrum)])


def sine(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def mp3_file(pcm: np.ndarray, rate: int) -> bytes:
    """An MP3 file as FFmpeg writes one: ID3 tag, Xing/Info frame with a LAME tag, frames."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=rate, layout="mono")
        stream.bit_rate = 48_000
        for start in range(0, pcm.size, 1000):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1000], format="flt", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def mp3_frames(pcm: np.ndarray, rate: int) -> bytes:
    """Bare MP3 frames with no tag or info frame, like a streaming service sends."""
    codec = av.CodecContext.create("libmp3lame", "w")
    codec.sample_rate = rate
    codec.layout = "mono"
    codec.format = "fltp"
    codec.bit_rate = 48_000
    data = bytearray()
    for start in range(0, pcm.size, 1152):
        frame = av.AudioFrame.from_ndarray(pcm[None, start : start + 1152], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        for packet in codec.encode(frame):
            data += bytes(packet)
    for packet in codec.encode(None):
        data += bytes(packet)
    return bytes(data)


def feed_in_random_pieces(decoder: Mp3StreamDecoder, data: bytes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out, at = [], 0
    while at < len(data):
        size = int(rng.integers(1, 400))
        out.append(decoder.feed(data[at : at + size]))
        at += size
    out.append(decoder.flush())
    return np.concatenate(out)


# --- sentences ---------------------------------------------------------------------


def test_split_keeps_each_sentence_mark_with_its_sentence() -> None:
    assert split_sentences("One. Two! Three? Four; five") == ["One.", "Two!", "Three?", "Four;", "five"]


def test_split_does_not_end_sentences_at_common_abbreviations() -> None:
    text = "Mr. and Mrs. Smith met Dr. Jones on Baker St. at noon, e.g. for lunch, i.e. food, etc. and left."
    assert split_sentences(f"Hi. {text}") == ["Hi.", text]


def test_split_does_not_break_decimals_or_dotted_names() -> None:
    assert split_sentences("Pi is 3.14 roughly. See example.com now.") == [
        "Pi is 3.14 roughly.",
        "See example.com now.",
    ]


def test_split_cuts_cjk_text_at_its_own_marks_without_spaces() -> None:
    assert split_sentences("你好。今天天气很好！你呢？好；再见") == ["你好。", "今天天气很好！", "你呢？", "好；", "再见"]


def test_split_cuts_at_newlines_and_drops_empty_pieces() -> None:
    assert split_sentences("  first line\n\n\n  second line \n \n") == ["first line", "second line"]


def test_split_keeps_closing_quotes_and_ellipses_with_their_sentence() -> None:
    assert split_sentences('He said "stop." Then left... Fine') == ['He said "stop."', "Then left...", "Fine"]


def test_split_of_blank_text_is_empty() -> None:
    assert split_sentences("") == []
    assert split_sentences(" \n\t ") == []


def test_split_cuts_long_sentence_under_max_chars_at_commas_first() -> None:
    clause = "the quick brown fox jumps over the lazy dog"
    text = ", ".join([clause] * 8) + "."
    pieces = split_sentences(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith((",", ".")) for p in pieces)  # cut after commas, not mid-clause
    assert " ".join(pieces) == text


def test_split_cuts_long_unpunctuated_text_at_spaces() -> None:
    text = " ".join(f"word{i}" for i in range(100))
    pieces = split_sentences(text, max_chars=60)
    assert all(len(p) <= 60 for p in pieces)
    assert " ".join(pieces) == text


def test_split_makes_a_long_first_sentence_short_at_its_first_late_comma() -> None:
    text = (
        "This opening sentence runs on for quite a while, and then it keeps going, "
        "well past any reasonable length for a first piece. Second."
    )
    pieces = split_sentences(text)
    assert pieces[0] == "This opening sentence runs on for quite a while,"
    assert pieces[1:] == ["and then it keeps going, well past any reasonable length for a first piece.", "Second."]


def test_split_leaves_a_short_first_sentence_whole() -> None:
    assert split_sentences("Short, sweet, done. Next one, here.") == ["Short, sweet, done.", "Next one, here."]


# --- espeak --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def espeak() -> EspeakBackend:
    return EspeakBackend()


async def test_espeak_yields_audible_16k_pcm_of_plausible_duration(espeak: EspeakBackend) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    chunks = await collect(espeak.stream(text))
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    pcm = to_float(np.concatenate(chunks))
    assert np.sqrt(np.mean(pcm**2)) > 0.02
    words = len(text.split())
    assert 0.2 * words <= pcm.size / SAMPLE_RATE <= 1.5 * words  # 175 words a minute: 0.34


async def test_espeak_output_has_speech_band_energy_at_16k(espeak: EspeakBackend) -> None:
    # Resampled to 16 kHz, a voice's energy sits well below the 8 kHz Nyquist limit.
    pcm = np.concatenate(await collect(espeak.stream("Speech energy lives low.")))
    spectrum = np.abs(np.fft.rfft(pcm)) ** 2
    freqs = np.fft.rfftfreq(pcm.size, 1 / SAMPLE_RATE)
    assert spectrum[freqs < 4000].sum() > 0.9 * spectrum.sum()


async def test_espeak_yields_one_chunk_per_sentence_in_order(espeak: EspeakBackend) -> None:
    short, long_ = "Hi.", "This sentence is a good deal longer than the other two are."
    chunks = await collect(espeak.stream(f"{short} {long_} {short}"))
    assert len(chunks) == 3
    assert chunks[1].size > 2 * chunks[0].size
    assert chunks[1].size > 2 * chunks[2].size


async def test_espeak_first_chunk_arrives_quickly(espeak: EspeakBackend) -> None:
    started = time.perf_counter()
    first_after = None
    audio = 0
    async for chunk in espeak.stream(THREE_SENTENCES):
        first_after = first_after if first_after is not None else time.perf_counter() - started
        audio += chunk.size
    total = time.perf_counter() - started
    log.info(
        "espeak: first sentence after %.1f ms; %.2f s of audio in %.1f ms (realtime factor %.4f)",
        first_after * 1000, audio / SAMPLE_RATE, total * 1000, total / (audio / SAMPLE_RATE),
    )  # fmt: skip
    assert first_after is not None and first_after < 1.0


async def test_espeak_trims_leading_silence_of_the_first_sentence_only(espeak: EspeakBackend) -> None:
    chunks = await collect_float(espeak.stream("Go now. Go now."))
    onset = [int(np.flatnonzero(np.abs(c) > 0.01)[0]) for c in chunks]
    assert onset[0] < 0.008 * SAMPLE_RATE
    assert onset[1] > onset[0]


async def test_espeak_pauses_between_sentences_but_not_after_the_last(espeak: EspeakBackend) -> None:
    chunks = await collect_float(espeak.stream("First part. Last part."))

    def trailing_silence_s(pcm: np.ndarray) -> float:
        return (pcm.size - 1 - int(np.flatnonzero(np.abs(pcm) > 0.01)[-1])) / SAMPLE_RATE

    assert 0.1 <= trailing_silence_s(chunks[0]) <= 0.6
    assert trailing_silence_s(chunks[-1]) < 0.05


async def test_espeak_blank_text_yields_nothing(espeak: EspeakBackend) -> None:
    assert await collect(espeak.stream("")) == []
    assert await collect(espeak.stream("  \n\t ")) == []


async def test_espeak_unknown_voice_raises_tts_error_saying_how_to_list_voices(espeak: EspeakBackend) -> None:
    with pytest.raises(TTSError, match="voices()"):
        await collect(espeak.stream("Hello.", voice="xx-nonexistent"))
    with pytest.raises(TTSError, match="no voice"):
        EspeakBackend(voice="xx-nonexistent")
    # The failure leaves the engine usable.
    assert await collect(espeak.stream("Still here."))


async def test_espeak_accepts_language_codes_and_variants(espeak: EspeakBackend) -> None:
    assert "en-gb" in espeak.voices()
    for voice in ("en-gb", "EN-US", "en-us+f3", "fr-fr"):
        assert await collect(espeak.stream("Bonjour.", voice=voice)), voice


async def test_espeak_rate_changes_duration(espeak: EspeakBackend) -> None:
    text = "Counting one two three four five six."
    slow = np.concatenate(await collect(EspeakBackend(rate=120).stream(text)))
    fast = np.concatenate(await collect(EspeakBackend(rate=300).stream(text)))
    assert slow.size > 1.8 * fast.size


def test_espeak_rejects_out_of_range_rate() -> None:
    with pytest.raises(TTSError, match="rate"):
        EspeakBackend(rate=5)


async def test_espeak_rejects_overlong_text(espeak: EspeakBackend) -> None:
    with pytest.raises(TTSError, match="too long"):
        await collect(espeak.stream("a " * (MAX_TEXT_CHARS // 2 + 1)))


def spectral_similarity(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = (welch(x, SAMPLE_RATE, nperseg=1024)[1] for x in (a, b))
    return float(pa @ pb / np.linalg.norm(pa) / np.linalg.norm(pb))


async def test_espeak_backends_streaming_at_once_do_not_mix_their_voices() -> None:
    # The library is process-global: concurrent streams must each keep their own voice.
    # espeak-ng varies its output slightly from call to call, so compare spectra, not samples.
    low, high = EspeakBackend(pitch=10), EspeakBackend(voice="en-gb", pitch=90)
    alone = [await collect(low.stream(THREE_SENTENCES)), await collect(high.stream(THREE_SENTENCES))]
    together = await asyncio.gather(collect(low.stream(THREE_SENTENCES)), collect(high.stream(THREE_SENTENCES)))
    for mine, other, mixed in ((alone[0], alone[1], together[0]), (alone[1], alone[0], together[1])):
        assert len(mixed) == len(mine) == 3
        for own, foreign, chunk in zip(mine, other, mixed, strict=True):
            assert chunk.size == pytest.approx(own.size, rel=0.05)
            same = spectral_similarity(chunk, own)
            assert same > 0.9 and spectral_similarity(chunk, foreign) < same - 0.1


# --- MP3 decoding --------------------------------------------------------------------


def test_mp3_decoder_trims_encoder_delay_and_padding_to_the_right_duration() -> None:
    source = sine(1.234, 24_000)
    pcm = feed_in_random_pieces(Mp3StreamDecoder(), mp3_file(source, 24_000), seed=7)
    assert pcm.dtype == np.int16
    assert abs(pcm.size / SAMPLE_RATE - 1.234) <= 0.05
    assert dominant_hz(pcm) == pytest.approx(440, abs=5)


def test_mp3_decoder_gives_the_same_audio_whatever_the_piece_sizes() -> None:
    data = mp3_file(sine(0.5, 24_000), 24_000)
    a = feed_in_random_pieces(Mp3StreamDecoder(), data, seed=1)
    b = feed_in_random_pieces(Mp3StreamDecoder(), data, seed=2)
    assert a.size / SAMPLE_RATE == pytest.approx(0.5, abs=0.05) and dominant_hz(a) == pytest.approx(440, abs=5)
    np.testing.assert_array_equal(a, b)


def test_mp3_decoder_decodes_bare_frames_as_a_service_streams_them() -> None:
    pcm = feed_in_random_pieces(Mp3StreamDecoder(), mp3_frames(sine(1.0, 24_000), 24_000), seed=3)
    # No info frame to say how much the encoder added: at most its delay and a frame.
    assert 1.0 <= pcm.size / SAMPLE_RATE <= 1.1
    assert dominant_hz(pcm) == pytest.approx(440, abs=5)


def test_mp3_decoder_yields_audio_before_the_stream_ends() -> None:
    data = mp3_file(sine(2.0, 24_000), 24_000)
    decoder = Mp3StreamDecoder()
    early = decoder.feed(data[: len(data) // 2])
    assert early.size / SAMPLE_RATE > 0.5


def test_mp3_decoder_skips_garbage_and_decodes_the_stream_after_it() -> None:
    decoder = Mp3StreamDecoder()
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    noise = np.concatenate([decoder.feed(garbage), feed_in_random_pieces(decoder, mp3_frames(sine(1.0, 24_000), 24_000), seed=4)])
    assert noise.dtype == np.int16
    # what the garbage happened to decode to is short; the real stream after it is all there
    assert 1.0 <= noise.size / SAMPLE_RATE <= 1.3
    assert dominant_hz(noise[-SAMPLE_RATE // 2 :]) == pytest.approx(440, abs=5)


# --- edge ----------------------------------------------------------------------------


async def test_edge_unreachable_service_raises_tts_error_fast() -> None:
    # Port 9 on loopback is closed: the proxy connection is refused, internet or not.
    backend = EdgeTTSBackend(proxy="http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(TTSError, match="could not reach its service.*espeak"):
        await asyncio.wait_for(collect(backend.stream("Hello world.")), 10)
    assert time.perf_counter() - started < 5


class FakeCommunicate:
    """Stands in for edge_tts.Communicate: streams a prepared MP3 in small messages."""

    def __init__(self, mp3: bytes | None, error: BaseException | None = None) -> None:
        self.mp3, self.error = mp3, error

    async def stream(self) -> AsyncIterator[dict[str, Any]]:
        if self.error is not None:
            raise self.error
        if self.mp3 is None:
            await asyncio.sleep(3600)  # a service that never answers
        yield {"type": "SentenceBoundary", "offset": 0, "duration": 0, "text": ""}
        for at in range(0, len(self.mp3), 500):
            yield {"type": "audio", "data": self.mp3[at : at + 500]}


@pytest.fixture
def fake_service(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Each sentence gets MP3 audio 0.1 s long per character; returns the calls made."""
    calls: list[dict[str, Any]] = []

    def communicate(text: str, voice: str, **options: Any) -> FakeCommunicate:
        calls.append({"text": text, "voice": voice, **options})
        return FakeCommunicate(mp3_file(sine(0.1 * len(text), 24_000), 24_000))

    monkeypatch.setattr(tts.edge.edge_tts, "Communicate", communicate)
    return calls


async def test_edge_streams_each_sentence_in_order_with_the_given_proxy(fake_service: list[dict[str, Any]]) -> None:
    backend = EdgeTTSBackend(proxy="http://proxy.invalid:3128")
    chunks = await collect(backend.stream("One. Three. ... Seven!", voice="en-GB-SoniaNeural"))
    assert [c["text"] for c in fake_service] == ["One.", "Three.", "Seven!"]  # "..." says nothing
    assert all(c["voice"] == "en-GB-SoniaNeural" and c["proxy"] == "http://proxy.invalid:3128" for c in fake_service)
    assert len(chunks) > 3  # decoded as the bytes arrived, not one chunk per sentence
    seconds = np.concatenate(chunks).size / SAMPLE_RATE
    assert seconds == pytest.approx(0.1 * (4 + 6 + 6), abs=0.15)


async def test_edge_service_that_never_answers_raises_tts_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tts.edge.edge_tts, "Communicate", lambda *a, **k: FakeCommunicate(None))
    backend = EdgeTTSBackend(first_audio_timeout=0.2)
    with pytest.raises(TTSError, match="could not reach its service"):
        await collect(backend.stream("Hello."))


async def test_edge_service_errors_become_tts_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    error = tts.edge.edge_tts.exceptions.NoAudioReceived("No audio was received")
    monkeypatch.setattr(tts.edge.edge_tts, "Communicate", lambda *a, **k: FakeCommunicate(b"", error))
    with pytest.raises(TTSError, match="NoAudioReceived"):
        await collect(EdgeTTSBackend().stream("Hello."))


async def test_edge_malformed_voice_raises_tts_error() -> None:
    with pytest.raises(TTSError, match="rejected"):
        await collect(EdgeTTSBackend(voice="not a voice!").stream("Hello."))


# --- registry ------------------------------------------------------------------------


def test_create_tts_unknown_name_raises_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="espeak.*edge"):
        create_tts("festival")


def test_create_tts_builds_backends_by_name_with_options() -> None:
    assert tts_names() == ["espeak", "edge", "openai", "piper"]
    backend = create_tts("espeak", voice="en-gb", rate=150)
    assert isinstance(backend, EspeakBackend) and backend.voice == "en-gb" and backend.rate == 150
    assert isinstance(create_tts("Edge", proxy="http://127.0.0.1:9"), EdgeTTSBackend)


def test_create_tts_import_failure_becomes_tts_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TTS_BACKENDS, "edge", "tts_module_that_is_not_installed:Backend")
    with pytest.raises(TTSError, match="pip install edge-tts"):
        create_tts("edge")


def test_package_exports_the_public_api() -> None:
    assert {"create_tts", "tts_names", "TTSBackend", "TTSError"} <= set(tts.__all__)


def test_espeak_without_any_library_says_how_to_install_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    with pytest.raises(TTSError, match="pip install espeakng-loader.*libespeak-ng1"):
        tts.espeak._open_library()


def test_espeak_falls_back_to_the_system_library(monkeypatch: pytest.MonkeyPatch) -> None:
    import espeakng_loader

    wheel_library = espeakng_loader.get_library_path()
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: wheel_library if name == "espeak-ng" else None)
    library, data_path = tts.espeak._open_library()
    assert data_path is None  # a system library finds its own data
    assert hasattr(library, "espeak_Synth")


def test_split_never_cuts_inside_numbers_or_times() -> None:
    text = "In the year of our survey we found that the city had grown to about 12,500,000 people living there, and then more."
    pieces = split_sentences(text)
    assert pieces[0].endswith("12,500,000 people living there,") and pieces[1] == "and then more."
    long = ("The meeting starts at 3:30 in the afternoon and goes on until everyone has had a say " * 4).strip() + "."
    assert all(not p.endswith("3:") for p in split_sentences(long, max_chars=60))
