"""The OpenAI-compatible speech backend against a real local server
(``tests.support.fake_openai``): whole audio at 16 kHz, one request per sentence with
the first audio before the last sentence is asked for, errors as TTSErrors, voices."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from media.pcm import Pcm
from media.timing import SAMPLE_RATE
from tests.support.fake_openai import VOICE_HZ, FakeOpenAI, SpeechScript, voice_like, wav_bytes
from tts import TTSError, create_tts, tts_names
from tts.openai_speech import OPENAI_VOICES, OpenAISpeechBackend, RawPcmDecoder, WavStreamDecoder, server_error_message

KEY = "sk-test-key"
SECONDS_PER_CHAR = 0.04


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        server.speech = SpeechScript(seconds_per_char=SECONDS_PER_CHAR)
        yield server


@pytest.fixture
async def backend(fake: FakeOpenAI) -> AsyncIterator[Callable[..., OpenAISpeechBackend]]:
    made: list[OpenAISpeechBackend] = []

    def make(**options: Any) -> OpenAISpeechBackend:
        fields: dict[str, Any] = {"base_url": fake.base_url, "api_key": KEY, "voice": "af_heart", **options}
        made.append(OpenAISpeechBackend(**fields))
        return made[-1]

    yield make
    for b in made:
        await b.close()


async def collect(stream: AsyncIterator[Pcm]) -> list[Pcm]:
    return [chunk async for chunk in stream]


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float32)))
    return float(np.fft.rfftfreq(pcm.size, 1 / SAMPLE_RATE)[np.argmax(spectrum)])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- audio ---------------------------------------------------------------------------


@pytest.mark.parametrize("response_format", ["pcm", "wav"])
async def test_audio_comes_back_whole_at_16k_with_the_right_duration(
    backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI, response_format: str
) -> None:
    fake.speech = SpeechScript(seconds_per_char=SECONDS_PER_CHAR, delay_s=0.005)  # chunks apart, as a real server sends them
    text = "Hello there, how are you doing today?"
    chunks = await collect(backend(response_format=response_format).stream(text))
    pcm = np.concatenate(chunks)
    assert pcm.dtype == np.int16 and len(chunks) > 3  # streamed as it arrived, not in one piece
    assert pcm.size == pytest.approx(len(text) * SECONDS_PER_CHAR * SAMPLE_RATE, abs=16)  # within 1 ms
    assert dominant_hz(pcm) == pytest.approx(VOICE_HZ, abs=3)
    assert np.abs(pcm).max() > 3000
    body = fake.speech_calls[0].body
    assert body == {"model": "tts-1", "input": text, "voice": "af_heart", "response_format": response_format, "speed": 1.0}
    assert fake.speech_calls[0].headers["Authorization"] == f"Bearer {KEY}"


async def test_a_wav_at_another_rate_is_resampled_by_its_own_header(backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI) -> None:
    fake.speech = SpeechScript(seconds_per_char=SECONDS_PER_CHAR, wav_rate=22_050)  # piper voices' rate
    pcm = np.concatenate(await collect(backend(response_format="wav").stream("Twenty two kilohertz.")))
    assert pcm.size == pytest.approx(21 * SECONDS_PER_CHAR * SAMPLE_RATE, abs=16)
    assert dominant_hz(pcm) == pytest.approx(VOICE_HZ, abs=3)


async def test_each_sentence_is_one_request_and_speech_starts_before_the_last_is_asked_for(
    backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI
) -> None:
    fake.speech = SpeechScript(seconds_per_char=SECONDS_PER_CHAR, first_delay_s=0.15)  # synthesis time per request
    text = "First sentence here. Then a second one! And a third?"
    first_audio_at = None
    total = 0
    async with contextlib.aclosing(backend(speed=1.25).stream(text, voice="bf_emma")) as chunks:
        async for chunk in chunks:
            first_audio_at = first_audio_at or time.monotonic()
            total += chunk.size
    calls = fake.speech_calls
    assert [c.body["input"] for c in calls] == ["First sentence here.", "Then a second one!", "And a third?"]
    assert all(c.body["voice"] == "bf_emma" and c.body["speed"] == 1.25 for c in calls)
    assert first_audio_at is not None and first_audio_at < calls[-1].received_at - 0.1
    chars = sum(len(c.body["input"]) for c in calls)
    assert total == pytest.approx(chars * SECONDS_PER_CHAR / 1.25 * SAMPLE_RATE, abs=3 * 16)


async def test_stopping_early_hangs_up_the_speech_request(backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI) -> None:
    fake.speech = SpeechScript(seconds_per_char=0.1, delay_s=0.05)
    async with contextlib.aclosing(backend().stream("A long sentence that takes a good while to stream.")) as chunks:
        async for _ in chunks:
            break  # an interrupt
    for _ in range(200):
        if fake.speech_calls[0].outcome != "running":
            break
        await asyncio.sleep(0.01)
    assert fake.speech_calls[0].outcome == "client_disconnected"


async def test_text_with_nothing_to_say_makes_no_request(backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI) -> None:
    assert await collect(backend().stream(" ... \n !? ")) == []
    assert fake.speech_calls == []


# --- errors --------------------------------------------------------------------------


async def test_server_errors_become_tts_errors_with_the_servers_message(
    backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI
) -> None:
    with pytest.raises(TTSError, match=r"401.*Incorrect API key provided.*api_key"):
        await collect(backend(api_key="sk-wrong").stream("Hello."))
    with pytest.raises(TTSError, match=r"400.*Voice 'nobody' not found"):  # Kokoro-FastAPI's FastAPI-shaped error
        await collect(backend().stream("Hello.", voice="nobody"))
    with pytest.raises(TTSError, match=r"404.*model `tts-9` does not exist.*base_url"):
        await collect(backend(model="tts-9").stream("Hello."))
    fake.speech = SpeechScript(status=500, error_message="Kokoro model not loaded")
    with pytest.raises(TTSError, match=r"500.*Kokoro model not loaded"):
        await collect(backend().stream("Hello."))


async def test_an_unreachable_server_is_a_tts_error_pointing_at_espeak() -> None:
    speech = OpenAISpeechBackend(base_url=f"http://127.0.0.1:{closed_port()}/v1")
    started = time.monotonic()
    try:
        with pytest.raises(TTSError, match="cannot be reached.*is it running.*espeak"):
            await asyncio.wait_for(collect(speech.stream("Hello.")), 10)
    finally:
        await speech.close()
    assert time.monotonic() - started < 3


async def test_a_server_that_never_answers_is_a_tts_error_after_the_timeout(
    backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI
) -> None:
    fake.speech = SpeechScript(first_delay_s=30)
    started = time.monotonic()
    with pytest.raises(TTSError, match="no audio within 0.3 s"):
        await collect(backend(first_audio_timeout=0.3).stream("Hello."))
    assert time.monotonic() - started < 2


async def test_an_audio_stream_that_breaks_off_is_a_tts_error(backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI) -> None:
    fake.speech = SpeechScript(seconds_per_char=0.1, drop_after_chunks=2)
    with pytest.raises(TTSError, match="broke off"):
        await asyncio.wait_for(collect(backend().stream("A sentence long enough for several chunks.")), 5)


def test_bad_options_are_tts_errors_at_creation() -> None:
    with pytest.raises(TTSError, match="response_format"):
        OpenAISpeechBackend(response_format="mp3")
    with pytest.raises(TTSError, match="speed"):
        OpenAISpeechBackend(speed=9)
    with pytest.raises(TTSError, match="base_url"):
        OpenAISpeechBackend(base_url="localhost:8880")


def test_server_error_message_reads_the_shapes_servers_answer_with() -> None:
    assert server_error_message('{"error": {"message": "bad key", "type": "x"}}') == "bad key"
    assert server_error_message('{"error": "model \'x\' not found"}') == "model 'x' not found"
    assert server_error_message('{"detail": [{"msg": "field required"}]}') == "field required"
    assert server_error_message("<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"
    assert len(server_error_message("x" * 1000)) == 300


# --- voices, keys, registry ----------------------------------------------------------


async def test_voices_come_from_the_servers_list(backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI) -> None:
    assert await backend().voices() == ["af_heart", "am_adam", "bf_emma"]


async def test_voices_fall_back_to_the_configured_voice_without_a_list(
    backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI
) -> None:
    fake.voices = None  # the route answers 404
    assert await backend(voice="onyx").voices() == ["onyx"]
    speech = OpenAISpeechBackend(base_url=f"http://127.0.0.1:{closed_port()}/v1", voice="nova")
    try:
        assert await speech.voices() == ["nova"]
    finally:
        await speech.close()


async def test_openai_itself_offers_its_fixed_voices_without_asking() -> None:
    speech = OpenAISpeechBackend()  # api.openai.com: no request is made
    assert await speech.voices() == list(OPENAI_VOICES)
    await speech.close()


async def test_the_openai_key_from_the_environment_goes_only_to_openai(
    monkeypatch: pytest.MonkeyPatch, backend: Callable[..., OpenAISpeechBackend], fake: FakeOpenAI
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert OpenAISpeechBackend()._api_key == "sk-from-env"
    fake.api_key = None
    await collect(backend(api_key=None).stream("Hi."))
    assert "Authorization" not in fake.speech_calls[0].headers
    assert "sk-from-env" not in repr(OpenAISpeechBackend())


def test_registry_builds_the_openai_backend_from_command_line_options() -> None:
    assert "openai" in tts_names()
    # --tts-option values arrive parsed: numbers as numbers
    speech = create_tts("openai", base_url="http://127.0.0.1:8880/v1", api_key=1234, model="kokoro", speed=1, response_format="WAV")
    assert isinstance(speech, OpenAISpeechBackend)
    assert (speech._api_key, speech.model, speech.speed, speech.response_format) == ("1234", "kokoro", 1.0, "wav")


# --- decoders ------------------------------------------------------------------------


def test_raw_pcm_decoding_does_not_depend_on_how_the_bytes_are_cut() -> None:
    data = voice_like(0.5).astype("<i2").tobytes()
    whole = RawPcmDecoder()
    expected = np.concatenate([whole.feed(data), whole.flush()])
    pieces = RawPcmDecoder()
    got = np.concatenate([pieces.feed(data[i : i + 333]) for i in range(0, len(data), 333)] + [pieces.flush()])
    assert got.size == expected.size == pytest.approx(0.5 * SAMPLE_RATE, abs=2)
    assert np.abs(got.astype(np.int32) - expected).max() <= 1


def test_wav_decoding_mixes_float_stereo_to_mono_and_stops_at_the_data_size() -> None:
    rate, n = 48_000, 4800
    left = np.sin(2 * np.pi * 300 * np.arange(n) / rate).astype("<f4") * 0.5
    frames = np.stack([left, left], axis=1).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 2, rate, rate * 8, 8, 32)
    wav = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    wav += b"LIST" + struct.pack("<I", 5) + b"abcde\0"  # an odd-sized chunk, padded
    wav += b"data" + struct.pack("<I", len(frames)) + frames + b"junk after the data"
    decoder = WavStreamDecoder()
    pcm = np.concatenate([decoder.feed(wav[i : i + 7]) for i in range(0, len(wav), 7)] + [decoder.flush()])
    assert pcm.size == pytest.approx(n / 3, abs=2)
    assert 0.45 * 32768 < np.abs(pcm).max() < 0.55 * 32768


def test_an_answer_that_is_not_wav_is_a_tts_error() -> None:
    with pytest.raises(TTSError, match="not WAV"):
        WavStreamDecoder().feed(b"ID3\x04\x00\x00\x00\x00\x00\x00 mp3 data")
    decoder = WavStreamDecoder()
    decoder.feed(wav_bytes(voice_like(0.1), 24_000)[:20])
    with pytest.raises(TTSError, match="not a complete WAV"):
        decoder.flush()
