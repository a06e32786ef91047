"""A real local HTTP server that speaks OpenAI's API, for the chat client's and the speech
backend's tests: started in-process on a free loopback port.

``/v1/chat/completions`` streams as OpenAI does (a role delta first, content deltas, a
chunk with ``finish_reason``, ``data: [DONE]``), or answers one JSON body without
``stream``; errors are OpenAI's error JSON with its status. ``ChatScript`` adds the
faults: slow chunks, a long wait before the first, a stall, a dropped connection, a line
that is not JSON, an error event mid-stream. Every request is recorded as a ``ChatCall``
whose ``outcome`` says how it ended, including whether the client went away early.

``/v1/audio/speech`` answers a voice-like signal (a 140 Hz harmonic buzz, syllable-paced)
lasting ``seconds_per_char`` per input character, streamed as 24 kHz s16le ``pcm`` or as a
``wav`` with an unknown data size, as streaming servers write; ``/v1/audio/voices`` lists
the voices as Kokoro-FastAPI does.
"""
from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

SPEECH_RATE = 24_000
VOICE_HZ = 140.0
_TOKEN = re.compile(r"\s*\S+|\s+")  # tokens as models send them: a word with its leading space


@dataclass(frozen=True)
class ChatScript:
    """How the next chat completions answer. ``*_after`` count content chunks sent."""

    reply: str = "Hello there. How can I help you today?"
    reasoning: str = ""  # sent first as reasoning_content deltas, as llama.cpp and vLLM send a reasoning model's thoughts
    delay_s: float = 0.0  # before each content chunk
    first_delay_s: float = 0.0  # before the first content chunk (reading the prompt)
    stall_after: int | None = None  # then send nothing more, keeping the connection open
    drop_after: int | None = None  # then drop the connection: no finish, no [DONE]
    malformed_after: int | None = None  # then a data line that is not JSON
    error_after: int | None = None  # then an error event, as vLLM and llama.cpp send mid-stream
    status: int = 200  # not 200: OpenAI's error JSON with this status, no stream
    error_message: str = "The server had an error while processing your request."
    error_type: str = "server_error"
    error_code: str | None = None
    finish_reason: str = "stop"
    send_done: bool = True
    force_json: bool = False  # answer one JSON body even when asked to stream
    html: bool = False  # answer 200 with a web page, as a wrong base_url or a captive portal does

    def tokens(self) -> list[str]:
        return _TOKEN.findall(self.reply)


@dataclass(frozen=True)
class SpeechScript:
    seconds_per_char: float = 0.04
    chunk_bytes: int = 4801  # odd, so samples straddle chunks as they do from real servers
    delay_s: float = 0.0  # before each chunk
    first_delay_s: float = 0.0  # before the response starts (synthesis)
    status: int = 200
    error_message: str = "The server had an error while processing your request."
    drop_after_chunks: int | None = None  # then drop the connection
    wav_rate: int = SPEECH_RATE


@dataclass
class ChatCall:
    """One chat request as the server saw it; the fields after ``headers`` change as it runs."""

    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    peer: Any = None  # the client's (host, port): the same port again is a reused connection
    chunks_sent: int = 0
    client_left: bool = False  # the client closed the connection before the server ended it
    outcome: str = "running"  # completed, client_disconnected, stalled, dropped, malformed, error_event, error_status
    ended_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, outcome: str) -> None:
        if self.ended_at is None:
            self.outcome, self.ended_at = outcome, time.monotonic()
            self.ended.set()

    async def wait_ended(self, timeout: float = 5.0) -> str:
        await asyncio.wait_for(self.ended.wait(), timeout)
        return self.outcome


@dataclass
class SpeechCall:
    body: dict[str, Any]
    headers: dict[str, str]
    received_at: float
    first_byte_at: float | None = None
    outcome: str = "running"  # completed, client_disconnected, dropped, error_status


class FakeOpenAI:
    """``async with FakeOpenAI() as fake:`` then point clients at ``fake.base_url``."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = ("fake-chat", "tts-1"),
        voices: tuple[str, ...] | None = ("af_heart", "am_adam", "bf_emma"),
    ) -> None:
        self.api_key = api_key
        self.models = models
        self.voices = voices  # None: no /audio/voices route (a 404, as OpenAI answers)
        self.chat = ChatScript()
        self.speech = SpeechScript()
        self.chat_calls: list[ChatCall] = []
        self.speech_calls: list[SpeechCall] = []
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_get("/v1/audio/voices", self._voices)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}/v1"
        return self.base_url

    async def close(self) -> None:
        self._closing.set()  # stalled handlers return
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- chat ---------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        call = ChatCall(body, dict(request.headers), time.monotonic(), peer)
        self.chat_calls.append(call)
        script = self.chat
        refused = self._refusal(request, body.get("model"))
        if refused is not None:
            call.end("error_status")
            return refused
        if script.status != 200:
            call.end("error_status")
            return _error(script.status, script.error_message, script.error_type, script.error_code)
        if script.html:
            call.end("completed")
            return web.Response(text="<html><body>Welcome to nginx!</body></html>", content_type="text/html")
        if script.force_json or not body.get("stream"):
            call.end("completed")
            return web.json_response(_completion(body, script.reply))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            outcome = await self._stream_chat(request, response, call, script)
        except ConnectionResetError:  # a write after the client went away
            call.client_left = True
            outcome = "client_disconnected"
        except asyncio.CancelledError:
            call.client_left = _gone(request)
            call.end("client_disconnected" if call.client_left else "cancelled")
            raise
        call.end(outcome)
        if outcome in ("dropped", "client_disconnected") and request.transport is not None:
            request.transport.close()
        return response

    async def _stream_chat(self, request: web.Request, response: web.StreamResponse, call: ChatCall, script: ChatScript) -> str:
        model = call.body.get("model") or "fake-chat"

        async def send(data: str) -> None:
            await response.write(f"data: {data}\n\n".encode())

        await send(json.dumps(_chunk(model, {"role": "assistant", "content": ""})))
        if not await self._pause(request, script.first_delay_s, call):
            return "client_disconnected"
        for thought in _TOKEN.findall(script.reasoning):
            await send(json.dumps(_chunk(model, {"content": None, "reasoning_content": thought})))
            if not await self._pause(request, script.delay_s, call):
                return "client_disconnected"
        for i, token in enumerate(script.tokens()):
            faults = (
                (script.stall_after, "stalled"),
                (script.drop_after, "dropped"),
                (script.malformed_after, "malformed"),
                (script.error_after, "error_event"),
            )
            for after, fault in faults:
                if after is not None and i == after:
                    return await self._fault(request, response, call, fault)
            if i and not await self._pause(request, script.delay_s, call):
                return "client_disconnected"
            await send(json.dumps(_chunk(model, {"content": token})))
            call.chunks_sent += 1
        await send(json.dumps(_chunk(model, {}, finish_reason=script.finish_reason)))
        if script.send_done:
            await send("[DONE]")
        await response.write_eof()
        return "completed"

    async def _fault(self, request: web.Request, response: web.StreamResponse, call: ChatCall, fault: str) -> str:
        if fault == "stalled":
            await self._pause(request, 3600.0, call)  # until the client leaves or the server closes
            return fault
        if fault == "malformed":
            await response.write(b'data: {"id": "chatcmpl-fake", "choices": [{"delta": {"content": "tru\n\n')
        elif fault == "error_event":
            error = {"error": {"message": "the model crashed: CUDA out of memory", "type": "server_error", "code": 500}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        else:
            return "dropped"  # the caller closes the transport mid-body
        await self._pause(request, 3600.0, call)  # a client must not wait for more after this
        return fault

    # --- speech -------------------------------------------------------------------

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        call = SpeechCall(body, dict(request.headers), time.monotonic())
        self.speech_calls.append(call)
        script = self.speech
        refused = self._refusal(request, body.get("model"))
        if refused is None and self.voices is not None and body.get("voice") not in self.voices:
            # Kokoro-FastAPI answers a bad voice in FastAPI's shape, not OpenAI's.
            message = f"Voice '{body.get('voice')}' not found"
            detail = {"error": "validation_error", "message": message, "type": "invalid_request_error"}
            refused = web.json_response({"detail": detail}, status=400)
        if refused is None and script.status != 200:
            refused = _error(script.status, script.error_message, "server_error")
        if refused is not None:
            call.outcome = "error_status"
            return refused
        audio = voice_like(len(str(body.get("input", ""))) * script.seconds_per_char / float(body.get("speed", 1.0)), script.wav_rate)
        fmt = body.get("response_format", "mp3")
        if fmt == "pcm":
            data, ctype = audio.astype("<i2").tobytes(), "audio/pcm"
        elif fmt == "wav":
            data, ctype = wav_bytes(audio, script.wav_rate, unknown_size=True), "audio/wav"
        else:
            call.outcome = "error_status"
            return _error(400, f"response_format {fmt!r} is not supported by this fake", "invalid_request_error")
        if not await self._pause(request, script.first_delay_s):
            call.outcome = "client_disconnected"
            return web.Response(status=499)
        response = web.StreamResponse(headers={"Content-Type": ctype})
        await response.prepare(request)
        try:
            for n, at in enumerate(range(0, len(data), script.chunk_bytes)):
                if script.drop_after_chunks is not None and n == script.drop_after_chunks:
                    call.outcome = "dropped"
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if n and not await self._pause(request, script.delay_s):
                    call.outcome = "client_disconnected"
                    return response
                await response.write(data[at : at + script.chunk_bytes])
                if call.first_byte_at is None:
                    call.first_byte_at = time.monotonic()
            await response.write_eof()
            call.outcome = "completed"
        except ConnectionResetError:
            call.outcome = "client_disconnected"
        return response

    async def _voices(self, request: web.Request) -> web.Response:
        if self.voices is None:
            return _error(404, "Not found", "invalid_request_error")
        return web.json_response({"voices": list(self.voices)})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]})

    # --- shared -------------------------------------------------------------------

    def _refusal(self, request: web.Request, model: Any) -> web.Response | None:
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                          "invalid_request_error", "invalid_api_key")  # fmt: skip
        if model is not None and model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, "invalid_request_error", "model_not_found")
        return None

    async def _pause(self, request: web.Request, seconds: float, call: ChatCall | None = None) -> bool:
        """Wait ``seconds``; False as soon as the client has gone (or the server closes)."""
        end = time.monotonic() + seconds
        while not self._closing.is_set():
            if _gone(request):
                if call is not None:
                    call.client_left = True
                return False
            left = end - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, 0.01))
        return False


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _error(status: int, message: str, kind: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status)


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def _completion(body: dict[str, Any], reply: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or "fake-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def voice_like(seconds: float, rate: int = SPEECH_RATE) -> np.ndarray:
    """int16 audio that looks like a voice to a level or pitch check: a 140 Hz fundamental
    with falling harmonics, its loudness rising and falling four times a second."""
    t = np.arange(round(seconds * rate)) / rate
    buzz = sum(np.sin(2 * np.pi * VOICE_HZ * k * t) / k for k in range(1, 9))
    envelope = 0.55 - 0.45 * np.cos(2 * np.pi * 4.0 * t)
    return np.rint(0.25 * 32767 * envelope * buzz / 2.0).astype(np.int16)


def wav_bytes(pcm: np.ndarray, rate: int, *, unknown_size: bool = False) -> bytes:
    """A 16-bit mono WAV; ``unknown_size`` writes 0xFFFFFFFF sizes, as a server that streams
    before it knows the length does."""
    data = pcm.astype("<i2").tobytes()
    riff, size = (0xFFFFFFFF, 0xFFFFFFFF) if unknown_size else (36 + len(data), len(data))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    header = b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    return header + b"data" + struct.pack("<I", size) + data
