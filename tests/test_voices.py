"""``GET /voices`` lists what the running TTS backend offers (espeak's installed voices,
an OpenAI-compatible server's list, edge's online list or, offline, its configured voice
at once), and ``voice`` on ``/human`` and the WebSocket picks one per utterance, refused
with a few that exist when the backend can tell."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from media.pcm import Pcm
from server.errors import ErrorCode
from tests.support.fake_openai import FakeOpenAI
from tests.support.harness import ToneTTS, running_server
from tts.base import VoiceCatalog, VoiceInfo
from tts.edge import EdgeTTSBackend
from tts.espeak import EspeakBackend
from tts.openai_speech import OpenAISpeechBackend


class VoicedTone(ToneTTS):
    """A tone per sentence that remembers the voice each utterance asked for."""

    name = "voiced"

    def __init__(self) -> None:
        super().__init__(ms_per_char=5)
        self.voice = "alto"
        self.asked: list[str | None] = []

    async def voice_catalog(self) -> VoiceCatalog:
        return VoiceCatalog(self.name, self.voice, [VoiceInfo(v, v.title()) for v in ("alto", "bass", "soprano", "tenor")],
                            complete=True)

    async def stream(self, text: str, voice: str | None = None) -> AsyncIterator[Pcm]:
        self.asked.append(voice)
        async for pcm in super().stream(text, voice):
            yield pcm


async def test_espeak_lists_its_installed_voices(tmp_path: Path) -> None:
    async with running_server(tmp_path, tts=EspeakBackend(voice="en-us")) as h:
        async with h.client.get("/voices") as resp:
            body = await resp.json()
        assert resp.status == 200
        data = body["data"]
        assert data["backend"] == "espeak" and data["default"] == "en-us" and data["complete"] is True
        by_id = {v["id"]: v for v in data["voices"]}
        assert len(by_id) > 50 and {"en-us", "en-gb", "de", "fr-fr"} <= set(by_id)
        assert by_id["en-us"]["name"] == "English (America)" and by_id["en-us"]["language"] == "en-us"
        viewer = await h.viewer()
        for voice in ("en-gb", "de", "en-us+f3"):
            status, reply = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hallo.", "voice": voice})
            assert status == 200, reply
        status, reply = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hi.", "voice": "en-uss"})
        assert status == 400 and reply["code"] == ErrorCode.INVALID_FIELD
        assert "no voice 'en-uss'" in reply["msg"] and "en-us" in reply["msg"] and "GET /voices" in reply["msg"]


async def test_voice_is_per_utterance_on_human_and_the_websocket(tmp_path: Path) -> None:
    tts = VoicedTone()
    async with running_server(tmp_path, tts=tts) as h:
        viewer = await h.viewer()
        sid = viewer.session.id
        assert (await h.post("/human", {"sessionid": sid, "text": "Low.", "voice": "bass"}))[0] == 200
        assert (await h.post("/human", {"sessionid": sid, "text": "Default."}))[0] == 200
        async with h.client.ws_connect(f"/humanecho?sessionid={sid}&secret={viewer.session.secret}") as ws:
            await ws.send_json({"text": "High.", "voice": "soprano"})
            await ws.send_json({"text": "Nobody.", "voice": "baritone"})
            while (event := await ws.receive_json(timeout=5))["event"] != "error":
                pass
            assert event["code"] == ErrorCode.INVALID_FIELD and "no voice 'baritone'" in event["msg"] and "bass" in event["msg"]
        await h.until(lambda: len(tts.asked) == 3 and not viewer.session.is_speaking)
        assert tts.asked == ["bass", None, "soprano"]


async def test_an_openai_compatible_server_lists_its_voices_and_speaks_with_the_one_asked(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        tts = OpenAISpeechBackend(base_url=fake.base_url, voice="af_heart")
        async with running_server(tmp_path, tts=tts) as h:
            async with h.client.get("/voices") as resp:
                data = (await resp.json())["data"]
            assert data == {"backend": "openai", "default": "af_heart", "complete": True,
                            "voices": [{"id": v, "name": v} for v in ("af_heart", "am_adam", "bf_emma")]}
            viewer = await h.viewer()
            status, _ = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hello.", "voice": "am_adam"})
            assert status == 200
            await h.until(lambda: bool(fake.speech_calls) and not viewer.session.is_speaking)
            assert fake.speech_calls[-1].body["voice"] == "am_adam"
            status, reply = await h.post("/human", {"sessionid": viewer.session.id, "text": "Hi.", "voice": "af_nobody"})
            assert status == 400 and "af_heart" in reply["msg"]
    async with FakeOpenAI(voices=None) as fake:  # a server without a voice list: any name is tried as sent
        tts = OpenAISpeechBackend(base_url=fake.base_url, voice="alloy")
        catalog = await tts.voice_catalog()
        assert catalog.complete is False and [v.id for v in catalog.voices] == ["alloy"] and catalog.note
        assert await tts.check_voice("anything") is None
        await tts.close()


async def test_edge_offline_answers_at_once_with_its_configured_voice_and_a_note(tmp_path: Path) -> None:
    # This machine has no way to Microsoft's service (no route, or the port is closed): the
    # list is not to be had, and the answer must say so without waiting for long.
    tts = EdgeTTSBackend(voice="de-DE-KatjaNeural", proxy="http://127.0.0.1:9", list_timeout=3.0)
    async with running_server(tmp_path, tts=tts) as h:
        started = time.monotonic()
        async with h.client.get("/voices") as resp:
            data = (await resp.json())["data"]
        assert time.monotonic() - started < 4
        assert data["backend"] == "edge" and data["complete"] is False and "online service" in data["note"]
        assert data["voices"] == [{"id": "de-DE-KatjaNeural", "name": "de-DE-KatjaNeural", "language": "de-DE"}]
        assert await asyncio.wait_for(tts.check_voice("en-US-GuyNeural"), 5) is None  # cannot tell: tried as sent
