"""Chat through the API (``POST /human`` and the WebSocket with ``type: "chat"``) against a
real local server that streams as OpenAI does (``tests.support.fake_openai``): each
sentence spoken as it arrives, interrupts that stop the model's stream and the speech,
slow, stalled and broken streams, no endpoint, and the history the next turn sends.
In-process (``tests/support/harness.py``)."""
from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server import routes
from server.errors import ErrorCode
from server.events import Subscription
from server.settings import load_settings
from tests.support.client import AvatarClient
from tests.support.fake_openai import ChatScript, FakeOpenAI
from tests.support.harness import Harness, ToneTTS, Viewer, running_server

KEY = "sk-chat-test"
THREE = "Hello there. This is the second sentence of the reply. And here is a third one to finish."
SENTENCES = ["Hello there.", "This is the second sentence of the reply.", "And here is a third one to finish."]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def h(tmp_path: Path, fake: FakeOpenAI) -> AsyncIterator[Harness]:
    # 5 ms of tone per character: a sentence is spoken in a fraction of a second
    async with running_server(tmp_path, tts=ToneTTS(ms_per_char=5), chat_base_url=fake.base_url, chat_model="fake-chat",
                              chat_api_key=KEY, chat_max_history_turns=4) as harness:
        yield harness


async def collect(events: Subscription, until: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Events, with their arrival time as ``at``, until ``until(event)`` holds (that one included)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not got or not until(got[-1]):
        event = await asyncio.wait_for(events.__anext__(), max(deadline - time.monotonic(), 0.01))
        got.append({**event, "at": time.monotonic()})
    return got


def reply_done(event: dict[str, Any]) -> bool:
    return event["event"] == "reply_text" and event["done"]


async def chat(h: Harness, viewer: Viewer, text: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    return await h.post("/human", {"sessionid": viewer.session.id, "text": text, "type": "chat", **fields})


async def test_sentences_are_spoken_in_order_as_they_stream_the_first_before_the_stream_ends(
    h: Harness, fake: FakeOpenAI
) -> None:
    fake.chat = ChatScript(reply=THREE, delay_s=0.06)
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    status, body = await chat(h, viewer, "Say three things.")
    assert status == 200 and body["data"]["started"] is True, body
    reply = body["data"]["reply"]
    got = await collect(events, reply_done)
    await fake.chat_calls[0].wait_ended()
    queued = [e for e in got if e["event"] == "queued"]
    assert [e["text"] for e in queued] == SENTENCES and all(e["reply"] == reply for e in queued)
    ended_at = fake.chat_calls[0].ended_at
    assert ended_at is not None and queued[0]["at"] < ended_at - 0.3, "the first sentence waited for the whole reply"
    texts = [e["text"] for e in got if e["event"] == "reply_text"]
    assert texts[-1] == THREE and texts == sorted(texts, key=len), "reply_text grows word by word"
    assert got[-1] == {**got[-1], "reply": reply, "done": True, "interrupted": False, "error": False}
    # each sentence is shown, in order, and every speech event names the reply
    utterances = [e["utterance"] for e in queued]
    await h.until(lambda: not viewer.session.is_speaking)
    firsts = [min(viewer.shown(u)) for u in utterances]
    assert firsts == sorted(firsts)
    assert all(viewer.shown(u) for u in utterances)
    assert fake.chat_calls[0].outcome == "completed"
    assert [t.reply for t in viewer.session.chat.history.turns] == [THREE]  # type: ignore[union-attr]


async def test_interrupt_stops_the_models_stream_and_the_speech(h: Harness, fake: FakeOpenAI) -> None:
    long_reply = " ".join(f"Sentence number {i} of a long answer." for i in range(40))
    fake.chat = ChatScript(reply=long_reply, delay_s=0.05)
    viewer = await h.viewer()
    sid = viewer.session.id
    events = viewer.session.events.subscribe()
    status, body = await chat(h, viewer, "Talk for a while.")
    assert status == 200
    started = await collect(events, lambda e: e["event"] == "speaking_started")
    status, cut = await h.post("/interrupt_talk", {"sessionid": sid})
    assert status == 200 and started[-1]["utterance"] in cut["data"]["interrupted"]
    call = fake.chat_calls[0]
    assert await call.wait_ended(3) == "client_disconnected" and call.client_left, "the model kept generating"
    after = await collect(events, reply_done, timeout=3)
    assert after[-1]["interrupted"] is True and after[-1]["reply"] == body["data"]["reply"]
    await asyncio.sleep(0.5)
    late = [e for e in after if e["event"] == "queued"]
    assert not late and not viewer.session.is_speaking, "speech queued after the interrupt"
    assert call.chunks_sent < len(long_reply.split())
    turn = viewer.session.chat.history.turns[-1]  # type: ignore[union-attr]
    assert turn.interrupted and turn.reply.startswith("Sentence number 0") and len(turn.reply) < len(long_reply) / 2


async def test_a_new_message_cuts_the_reply_in_progress_and_the_next_turn_carries_what_was_said(
    h: Harness, fake: FakeOpenAI
) -> None:
    fake.chat = ChatScript(reply=" ".join(f"Part {i} of the first answer." for i in range(30)), delay_s=0.05)
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    await chat(h, viewer, "First question?")
    await collect(events, lambda e: e["event"] == "speaking_started")
    fake.chat = ChatScript(reply="The second answer.")
    status, body = await chat(h, viewer, "Second question?")
    assert status == 200
    assert await fake.chat_calls[0].wait_ended(3) == "client_disconnected"
    got = await collect(events, lambda e: reply_done(e) and e["reply"] == body["data"]["reply"])
    assert [e["text"] for e in got if e["event"] == "queued"] == ["The second answer."]
    messages = fake.chat_calls[1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "First question?" and messages[3]["content"] == "Second question?"
    said = messages[2]["content"]
    assert said.startswith("Part 0 of the first answer.") and said.endswith("…"), said


async def test_a_reply_cut_while_still_being_said_is_kept_as_what_was_said(tmp_path: Path, fake: FakeOpenAI) -> None:
    # The model writes the whole reply at once; speaking it takes seconds (50 ms a character).
    async with running_server(tmp_path, tts=ToneTTS(), chat_base_url=fake.base_url, chat_api_key=KEY) as h:
        fake.chat = ChatScript(reply=THREE)
        viewer = await h.viewer()
        events = viewer.session.events.subscribe()
        await chat(h, viewer, "Three things?")
        got = await collect(events, lambda e: e["event"] == "speaking_started")
        if not any(reply_done(e) for e in got):
            await collect(events, reply_done)
        assert viewer.session.chat is not None and viewer.session.chat.history.turns[-1].reply == THREE
        assert viewer.session.is_speaking
        status, _ = await h.post("/interrupt_talk", {"sessionid": viewer.session.id})
        assert status == 200
        turn = viewer.session.chat.history.turns[-1]
        assert turn.interrupted and turn.reply == SENTENCES[0], turn


async def test_the_history_is_sent_with_the_next_message_and_stays_bounded(h: Harness, fake: FakeOpenAI) -> None:
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    for i in range(6):
        fake.chat = ChatScript(reply=f"Answer {i}.")
        status, _ = await chat(h, viewer, f"Question {i}?")
        assert status == 200
        await collect(events, reply_done)
        await h.until(lambda: not viewer.session.is_speaking)
    messages = fake.chat_calls[-1].body["messages"]
    assert fake.chat_calls[-1].headers["Authorization"] == f"Bearer {KEY}" and fake.chat_calls[-1].body["model"] == "fake-chat"
    # four turns kept (chat_max_history_turns): questions 1-4 with their answers, then the new one
    assert [m["content"] for m in messages[1:]] == [
        "Question 1?", "Answer 1.", "Question 2?", "Answer 2.", "Question 3?", "Answer 3.", "Question 4?", "Answer 4.", "Question 5?"]


async def test_a_slow_model_is_answered_at_once_and_spoken_when_it_starts(
    h: Harness, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(routes, "CHAT_ANSWER_WAIT_S", 0.3)
    fake.chat = ChatScript(reply="Sorry, I was thinking. Here I am.", first_delay_s=1.0, delay_s=0.05)
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    started = time.monotonic()
    status, body = await chat(h, viewer, "Are you there?")
    assert status == 200 and body["data"]["started"] is False and time.monotonic() - started < 0.9
    got = await collect(events, reply_done)
    assert [e["text"] for e in got if e["event"] == "queued"] == ["Sorry, I was thinking.", "Here I am."]
    assert not [e for e in got if e["event"] == "error"]


async def test_a_broken_stream_is_an_error_event_what_arrived_is_spoken_and_the_session_goes_on(
    h: Harness, fake: FakeOpenAI
) -> None:
    fake.chat = ChatScript(reply="The first sentence arrives whole. The second never ends because", drop_after=8, delay_s=0.05)
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    status, body = await chat(h, viewer, "Go on.")
    assert status == 200 and body["data"]["started"] is True
    got = await collect(events, reply_done)
    error = next(e for e in got if e["event"] == "error")
    assert error["code"] == ErrorCode.CHAT_FAILED and "broke off" in error["msg"], error
    assert error["reply"] == body["data"]["reply"] and got[-1]["error"] is True
    spoken = [e for e in got if e["event"] == "queued"]
    assert [e["text"] for e in spoken] == ["The first sentence arrives whole."]
    await h.until(lambda: bool(viewer.shown(spoken[0]["utterance"])))
    status, _ = await h.post("/human", {"sessionid": viewer.session.id, "text": "Still here."})
    assert status == 200 and not viewer.session.closed


async def test_a_stalled_stream_is_an_error_event_and_is_hung_up(h: Harness, fake: FakeOpenAI) -> None:
    assert h.manager.chat is not None
    h.manager.chat.config = dataclasses.replace(h.manager.chat.config, chunk_timeout_s=0.5)
    fake.chat = ChatScript(reply="One sentence comes. Then nothing at all for a long time.", stall_after=5)
    viewer = await h.viewer()
    events = viewer.session.events.subscribe()
    status, _ = await chat(h, viewer, "Hello?")
    assert status == 200
    got = await collect(events, reply_done, timeout=5)
    error = next(e for e in got if e["event"] == "error")
    assert error["code"] == ErrorCode.CHAT_TIMEOUT and "stalled" in error["msg"]
    assert await fake.chat_calls[0].wait_ended(3) in ("stalled", "client_disconnected") and fake.chat_calls[0].client_left
    assert [e["text"] for e in got if e["event"] == "queued"] == ["One sentence comes."]


async def test_a_model_that_refuses_or_cannot_be_reached_is_a_502_with_its_message(tmp_path: Path, fake: FakeOpenAI) -> None:
    async with running_server(tmp_path, chat_base_url=fake.base_url, chat_api_key="sk-wrong") as h:
        viewer = await h.viewer()
        status, body = await chat(h, viewer, "Hi!")
        assert status == 502 and body["code"] == ErrorCode.CHAT_FAILED
        assert "401" in body["msg"] and "Incorrect API key" in body["msg"] and "API key" in body["msg"]
        assert not viewer.session.closed
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with running_server(tmp_path, chat_base_url=f"http://127.0.0.1:{port}/v1") as h:
        viewer = await h.viewer()
        events = viewer.session.events.subscribe()
        status, body = await chat(h, viewer, "Hi!")
        assert status == 502 and "cannot reach the chat server" in body["msg"], body
        error = await collect(events, lambda e: e["event"] == "error")
        assert error[-1]["msg"] == body["msg"]  # the event says it too, for listeners


async def test_without_a_chat_endpoint_chat_is_a_400_naming_the_setting(tmp_path: Path) -> None:
    async with running_server(tmp_path) as h:
        viewer = await h.viewer()
        status, body = await chat(h, viewer, "Hi!")
        assert status == 400 and body["code"] == ErrorCode.CHAT_NOT_CONFIGURED and "--chat-base-url" in body["msg"]
        async with h.client.ws_connect(f"/humanecho?sessionid={viewer.session.id}&secret={viewer.session.secret}") as ws:
            await ws.send_json({"type": "chat", "text": "Hi!"})
            event = await ws.receive_json(timeout=5)
            assert event["event"] == "error" and event["code"] == ErrorCode.CHAT_NOT_CONFIGURED


async def test_chat_over_the_websocket_streams_the_reply_and_an_interrupt_message_cuts_it(h: Harness, fake: FakeOpenAI) -> None:
    fake.chat = ChatScript(reply=THREE, delay_s=0.03)
    viewer = await h.viewer()
    async with h.client.ws_connect(f"/humanecho?sessionid={viewer.session.id}&secret={viewer.session.secret}") as ws:
        await ws.send_json({"type": "chat", "text": "Say three things."})
        got = []
        while not (got and reply_done(got[-1])):
            got.append(await ws.receive_json(timeout=5))
        assert [e["text"] for e in got if e["event"] == "queued"] == SENTENCES
        fake.chat = ChatScript(reply=" ".join(["A long answer goes on."] * 30), delay_s=0.05)
        await ws.send_json({"type": "chat", "text": "Talk."})
        while (await ws.receive_json(timeout=5))["event"] != "speaking_started":
            pass
        await ws.send_json({"text": "Stop.", "interrupt": True})  # an echo message that interrupts
        assert await fake.chat_calls[1].wait_ended(3) == "client_disconnected"


def test_chat_settings_are_flags_variables_and_file_keys_and_the_key_is_masked() -> None:
    settings = load_settings(["--chat-base-url", "http://127.0.0.1:8080/v1", "--chat-api-key", "sk-very-secret",
                              "--chat-model", "qwen2.5", "--chat-max-history-turns", "3"],
                             {"LIPSYNC_CHAT_SYSTEM_PROMPT": "Be brief."})
    chat = settings.config.chat_config()
    assert chat is not None and chat.base_url == "http://127.0.0.1:8080/v1" and chat.api_key == "sk-very-secret"
    assert chat.model == "qwen2.5" and chat.max_history_turns == 3 and chat.system_prompt == "Be brief."
    shown = settings.describe()
    assert "sk-very-secret" not in shown and "chat_api_key" in shown and "***" in shown
    assert load_settings([], {}).config.chat_config() is None
    with pytest.raises(ValueError, match="--chat-base-url must be an http"):  # the server does not start (exit 2)
        load_settings(["--chat-base-url", "localhost:8080"], {}).config.chat_config()


@pytest.mark.slow
async def test_a_real_server_speaks_a_streamed_reply_at_a_webrtc_client_and_an_interrupt_stops_both(
    fake: FakeOpenAI, make_server: Any
) -> None:
    """The issue's bar, over real WebRTC against ``python -m server``: the reply is heard
    sentence by sentence while the model is still writing, and an interrupt stops the
    model's stream (the server sees the disconnect) and the speech."""
    server = await asyncio.to_thread(make_server, "--chat-base-url", fake.base_url, "--chat-model", "fake-chat",
                                     "--chat-api-key", KEY)
    fake.chat = ChatScript(reply=" ".join(f"This is sentence number {i} of a long spoken answer." for i in range(20)),
                           delay_s=0.08)
    async with AvatarClient(server.url, keep_images=False, tap_packets=True) as client:
        await client.connect()
        sse = await client.sse()
        body = await client.chat("Tell me a story.")
        assert body["data"]["started"] is True
        reply = body["data"]["reply"]
        first = await sse.until(lambda e: e.kind == "speaking_ended" and e.data.get("reply") == reply, timeout=20)
        second = await sse.until(lambda e: e.kind == "speaking_started" and e.data.get("reply") == reply
                                 and e.data["utterance"] != first.data["utterance"], timeout=20)
        call = fake.chat_calls[0]
        assert call.ended_at is None, "the model finished before the first sentence was said"
        heard = [p for p in client.received.audio_packets if p.rms > 0.01]
        assert heard and heard[0].t < second.t, "no speech heard while the reply streamed"
        cut = await client.interrupt()
        cut_at = time.monotonic()
        assert second.data["utterance"] in cut["data"]["interrupted"]
        assert await call.wait_ended(3) == "client_disconnected" and call.client_left
        await sse.until(lambda e: e.kind == "reply_text" and e.data["done"], timeout=5)
        await asyncio.sleep(1.0)
        late = [p for p in client.received.audio_packets if p.rms > 0.01 and p.t > cut_at + 0.2]
        assert not late, f"speech {late[-1].t - cut_at:.2f} s after the interrupt"
        assert not [e for e in sse.of("queued") if e.t > cut_at], "a sentence was queued after the interrupt"
        assert await client.is_speaking() is False
        await sse.close()
