"""The chat client against a real local server that streams as OpenAI does
(``tests.support.fake_openai``): sentences as soon as they end, the history it sends,
every way the server can fail, and the connection closed when the consumer stops."""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from server.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatClient,
    ChatConfig,
    ChatError,
    ChatHistory,
    ReplyPart,
    SentenceSplitter,
    speakable,
)
from tests.support.fake_openai import ChatScript, FakeOpenAI

KEY = "sk-test-key"
THREE = "Hello there. This is the second sentence of the reply. And here is a third one to finish."


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def connect(fake: FakeOpenAI) -> AsyncIterator[Callable[..., ChatClient]]:
    """A client for the fake server; keyword arguments override ``ChatConfig`` fields."""
    clients: list[ChatClient] = []

    def make(**overrides: Any) -> ChatClient:
        fields: dict[str, Any] = {"base_url": fake.base_url, "model": "fake-chat", "api_key": KEY, **overrides}
        client = ChatClient(ChatConfig(**fields))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def deltas(client: ChatClient, text: str = "Hi!", history: ChatHistory | None = None) -> list[str]:
    async with contextlib.aclosing(client.reply(history, text)) as stream:
        return [delta async for delta in stream]


async def parts(client: ChatClient, text: str = "Hi!", **kwargs: Any) -> list[ReplyPart]:
    async with contextlib.aclosing(client.replies(None, text, **kwargs)) as stream:
        return [part async for part in stream]


def split_streamed(text: str, pieces: list[str] | None = None) -> list[str]:
    splitter = SentenceSplitter()
    out: list[str] = []
    for piece in pieces if pieces is not None else [text]:
        out += splitter.feed(piece)
    return out + splitter.flush()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the sentence splitter -----------------------------------------------------------


def test_splitter_yields_a_sentence_once_the_space_after_it_arrives() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there.") == []  # might yet be "there.com"
    assert splitter.feed(" How") == ["Hello there."]
    assert splitter.feed(" are you?\n") == ["How are you?"]  # a newline ends one at once
    assert splitter.feed("Fine") == []
    assert splitter.flush() == ["Fine"]
    assert splitter.text == "Hello there. How are you?\nFine"


def test_splitter_keeps_abbreviations_decimals_initials_and_ellipses_whole() -> None:
    text = "Dr. Smith paid 3.14 dollars, e.g. a bargain... J. R. R. Tolkien agreed! Did Mrs. Jones? Yes."
    expected = ["Dr. Smith paid 3.14 dollars, e.g. a bargain...", "J. R. R. Tolkien agreed!", "Did Mrs. Jones?", "Yes."]
    assert split_streamed(text) == expected
    assert split_streamed(text, list(text)) == expected  # one character at a time, as a slow stream


def test_splitter_gives_the_same_sentences_however_the_stream_is_cut() -> None:
    text = "First one. Then 2.5 more, and then some!\n\n1. Step one.\n2. Step two.\n```\ncode. here\n```\nLast one"
    whole = split_streamed(text)
    rng = random.Random(7)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), 12))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert split_streamed(text, pieces) == whole
    assert whole == ["First one.", "Then 2.5 more, and then some!", "1, Step one.", "2, Step two.", "Last one"]


def test_splitter_reads_markdown_lists_and_links_as_plain_speech() -> None:
    text = "## Steps\n- **Preheat** the `oven`.\n* Read [the recipe](https://example.com/r).\n> Quoted _words_ here.\n"
    assert split_streamed(text) == ["Steps", "Preheat the oven.", "Read the recipe.", "Quoted words here."]


def test_splitter_skips_code_blocks_in_speech_but_keeps_them_in_the_text() -> None:
    text = "Here is the code:\n```python\nprint('a. b')\nx = 1\n```\nRun it. Done."
    splitter = SentenceSplitter()
    said = [s for ch in text for s in splitter.feed(ch)] + splitter.flush()
    assert said == ["Here is the code:", "Run it.", "Done."]
    assert "print('a. b')" in splitter.text


def test_splitter_skips_reasoning_blocks_in_speech_and_text() -> None:
    text = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHi! Nice to meet you."
    splitter = SentenceSplitter()
    said = [s for ch in text for s in splitter.feed(ch)] + splitter.flush()
    assert said == ["Hi!", "Nice to meet you."]
    assert splitter.text == "Hi! Nice to meet you."


def test_splitter_cuts_a_long_first_sentence_at_a_late_comma_while_it_streams() -> None:
    text = "This opening sentence runs on for quite a while, and then it keeps going, well past any reasonable length. Next."
    splitter = SentenceSplitter()
    said: list[tuple[int, str]] = []
    for i, ch in enumerate(text):
        said += [(i, s) for s in splitter.feed(ch)]
    assert said[0][1] == "This opening sentence runs on for quite a while,"
    assert said[0][0] < text.index("length.")  # spoken before the sentence's end arrived
    assert [s for _, s in said] + splitter.flush() == [
        "This opening sentence runs on for quite a while,",
        "and then it keeps going, well past any reasonable length.",
        "Next.",
    ]


def test_splitter_cuts_an_endless_sentence_under_max_chars() -> None:
    text = " ".join(["word"] * 200)
    splitter = SentenceSplitter(max_chars=100)
    pieces = [p for w in text.split(" ") for p in splitter.feed(w + " ")] + splitter.flush()
    assert all(len(p) <= 100 for p in pieces) and len(pieces) >= 10
    assert " ".join(pieces) == text


def test_speakable_drops_emoji_table_rules_and_pieces_with_nothing_to_say() -> None:
    assert speakable("Great job 🎉!") == "Great job!"
    assert speakable("|---|:---:|") == ""
    assert speakable("| Name | Age |") == "Name, Age"
    assert speakable("---") == ""
    assert speakable("...") == ""


# --- history and configuration -------------------------------------------------------


def test_history_sends_the_system_prompt_then_the_last_turns_then_the_new_text() -> None:
    history = ChatHistory(max_turns=2)
    for i in range(4):
        history.add(f"question {i}", f"answer {i}")
    assert history.messages("Be brief.", "question 4") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
        {"role": "user", "content": "question 3"},
        {"role": "assistant", "content": "answer 3"},
        {"role": "user", "content": "question 4"},
    ]


def test_history_drops_the_oldest_turns_past_its_character_budget() -> None:
    history = ChatHistory(max_turns=10, max_chars=100)
    for i in range(5):
        history.add(f"q{i} " + "x" * 20, f"a{i} " + "y" * 20)
    users = [m["content"][:2] for m in history.messages("", "now") if m["role"] == "user"]
    assert users == ["q3", "q4", "no"]


def test_history_keeps_an_interrupted_reply_as_what_was_said_with_a_marker() -> None:
    history = ChatHistory(max_turns=2)
    first = history.add("Tell me a story.", "Once upon a time. There was a fox. The end.")
    assert history.revise(first, "Once upon a time.")
    cut = history.add("Another?", "")
    assert history.revise(cut, "")  # interrupted before a word: the turns still alternate
    assistant = [m["content"] for m in history.messages("", "ok") if m["role"] == "assistant"]
    assert assistant == ["Once upon a time. …", "…"]
    assert history.turns[0].interrupted
    history.add("Third?", "Three.")
    assert not history.revise(first, "gone")  # dropped from the window: nothing to revise


def test_config_checks_its_values_and_keeps_the_key_out_of_its_repr() -> None:
    with pytest.raises(ValueError, match="http"):
        ChatConfig(base_url="localhost:8080")
    with pytest.raises(ValueError, match="chunk_timeout_s"):
        ChatConfig(base_url="http://127.0.0.1:8080/v1", chunk_timeout_s=0)
    config = ChatConfig(base_url="http://127.0.0.1:8080/v1/", api_key="sk-secret")
    assert config.url == "http://127.0.0.1:8080/v1/chat/completions"
    assert "sk-secret" not in repr(config)
    assert ChatClient(ChatConfig(base_url="http://127.0.0.1:8080/v1", max_history_turns=3)).new_history().max_turns == 3


# --- streaming against the server ----------------------------------------------------


async def test_reply_streams_the_deltas_and_sends_model_key_history_and_system_prompt(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(reply=THREE)
    history = ChatHistory(max_turns=4)
    history.add("Who are you?", "I am an avatar.")
    got = await deltas(connect(temperature=0.3, max_tokens=50), "And now?", history)
    assert "".join(got) == THREE and len(got) > 10
    call = fake.chat_calls[0]
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.body["model"] == "fake-chat" and call.body["stream"] is True
    assert call.body["temperature"] == 0.3 and call.body["max_tokens"] == 50
    assert call.body["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am an avatar."},
        {"role": "user", "content": "And now?"},
    ]
    assert await call.wait_ended() == "completed" and not call.client_left


async def test_replies_yield_the_first_sentence_before_the_stream_ends(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply=THREE, delay_s=0.05)  # ~17 chunks: the stream lasts ~0.85 s
    yielded: list[tuple[float, ReplyPart]] = []
    async with contextlib.aclosing(connect().replies(None, "Hi!")) as stream:
        async for part in stream:
            yielded.append((time.monotonic(), part))
    call = fake.chat_calls[0]
    assert call.ended_at is not None
    sentences = [p.sentence for _, p in yielded]
    assert sentences == ["Hello there.", "This is the second sentence of the reply.", "And here is a third one to finish."]
    assert yielded[0][0] < call.ended_at - 0.4  # spoken while the model was still writing
    assert yielded[0][1].text.startswith("Hello there.") and yielded[-1][1].text == THREE


async def test_replies_with_progress_follow_the_text_word_by_word(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply="One two three. Four five.")
    got = await parts(connect(), progress=True)
    texts = [p.text for p in got]
    assert texts == sorted(texts, key=len) and texts[-1] == "One two three. Four five."
    assert [p.sentence for p in got if p.sentence] == ["One two three.", "Four five."]
    assert len(got) >= 5


async def test_a_server_that_ignores_stream_true_is_read_whole(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply="All at once. Really.", force_json=True)
    assert [p.sentence for p in await parts(connect())] == ["All at once.", "Really."]


async def test_a_stream_without_done_is_complete_once_it_has_a_finish_reason(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply="Short.", send_done=False)
    assert "".join(await deltas(connect())) == "Short."


async def test_a_reasoning_model_thinking_past_the_first_token_timeout_is_not_cut_off(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(reply="Four.", reasoning="Two plus two is four, so I say four. " * 3, delay_s=0.03)  # ~0.8 s of thought
    got = await parts(connect(first_token_timeout_s=0.3, chunk_timeout_s=0.3))
    assert got == [ReplyPart("Four.", "Four.")]  # the thoughts are not said


# --- failures ------------------------------------------------------------------------


async def test_a_wrong_api_key_is_a_chat_error_with_the_servers_message(connect: Callable[..., ChatClient]) -> None:
    with pytest.raises(ChatError, match=r"401.*Incorrect API key provided.*check the chat API key") as caught:
        await deltas(connect(api_key="sk-wrong"))
    assert caught.value.kind == "http" and caught.value.status == 401


async def test_a_server_error_is_a_chat_error_with_the_servers_message(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(status=500, error_message="model failed to load: out of memory")
    with pytest.raises(ChatError, match=r"500.*model failed to load: out of memory") as caught:
        await deltas(connect())
    assert caught.value.status == 500


async def test_an_unknown_model_or_a_base_url_without_v1_says_what_to_check(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    with pytest.raises(ChatError, match=r"404.*model `llama-9000` does not exist.*base_url"):
        await deltas(connect(model="llama-9000"))
    with pytest.raises(ChatError, match=r"404.*ends in /v1"):
        await deltas(connect(base_url=fake.base_url.removesuffix("/v1")))


async def test_an_unreachable_server_is_a_chat_error_at_once() -> None:
    client = ChatClient(ChatConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1"))
    started = time.monotonic()
    try:
        with pytest.raises(ChatError, match="cannot reach the chat server.*is it running") as caught:
            await asyncio.wait_for(deltas(client), 10)
    finally:
        await client.close()
    assert caught.value.kind == "unreachable" and time.monotonic() - started < 3


async def test_a_stalled_stream_is_a_chat_error_after_the_chunk_timeout_and_is_hung_up(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(reply=THREE, stall_after=4)
    got: list[str] = []

    async def listen() -> None:
        async with contextlib.aclosing(connect(chunk_timeout_s=0.3).reply(None, "Hi")) as stream:
            async for delta in stream:
                got.append(delta)

    started = time.monotonic()
    with pytest.raises(ChatError, match=r"stalled: nothing for 0.3 s after \d+ chunks") as caught:
        await listen()
    assert caught.value.kind == "stalled"
    assert 0.3 <= time.monotonic() - started < 2.0
    assert "".join(got) == "Hello there. This is"
    await fake.chat_calls[0].wait_ended()
    assert fake.chat_calls[0].client_left


async def test_a_model_that_never_starts_is_a_chat_error_after_the_first_token_timeout(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(first_delay_s=30)
    started = time.monotonic()
    with pytest.raises(ChatError, match=r"said nothing within 0.3 s.*first_token_timeout_s") as caught:
        await deltas(connect(first_token_timeout_s=0.3, chunk_timeout_s=0.1))  # the role chunk does not count
    assert caught.value.kind == "timeout" and time.monotonic() - started < 2.0
    assert await fake.chat_calls[0].wait_ended() == "client_disconnected"


async def test_a_web_page_instead_of_an_event_stream_is_a_chat_error_about_base_url(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(html=True)
    with pytest.raises(ChatError, match="answered text/html, not a stream of events.*OpenAI-compatible"):
        await deltas(connect())


async def test_a_dropped_connection_is_a_chat_error(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply=THREE, drop_after=3)
    with pytest.raises(ChatError, match="broke off|ended after") as caught:
        await deltas(connect())
    assert caught.value.kind == "broken"


async def test_a_line_that_is_not_json_is_a_chat_error(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply=THREE, malformed_after=2)
    with pytest.raises(ChatError, match="not JSON") as caught:
        await asyncio.wait_for(deltas(connect()), 5)
    assert caught.value.kind == "malformed"
    await fake.chat_calls[0].wait_ended()
    assert fake.chat_calls[0].client_left  # the client hung up rather than wait for more


async def test_an_error_event_mid_stream_is_a_chat_error_with_its_message(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply=THREE, error_after=3)
    with pytest.raises(ChatError, match="failed mid-reply: the model crashed: CUDA out of memory") as caught:
        await asyncio.wait_for(deltas(connect()), 5)
    assert caught.value.kind == "server"


# --- stopping early ------------------------------------------------------------------


async def test_cancelling_the_consumer_hangs_up_so_the_server_stops_generating(
    fake: FakeOpenAI, connect: Callable[..., ChatClient]
) -> None:
    fake.chat = ChatScript(reply=THREE * 3, delay_s=0.05)
    first = asyncio.Event()

    async def speak() -> None:
        async with contextlib.aclosing(connect().replies(None, "Talk.")) as stream:
            async for _ in stream:
                first.set()

    task = asyncio.create_task(speak())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()  # an interrupt
    with pytest.raises(asyncio.CancelledError):
        await task
    call = fake.chat_calls[0]
    assert await call.wait_ended(2) == "client_disconnected"
    assert call.client_left and call.chunks_sent < len(ChatScript(reply=THREE * 3).tokens())


async def test_leaving_the_loop_and_closing_the_stream_hangs_up(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    fake.chat = ChatScript(reply=THREE * 3, delay_s=0.05)
    async with contextlib.aclosing(connect().replies(None, "Talk.")) as stream:
        async for part in stream:
            assert part.sentence == "Hello there."
            break
    assert await fake.chat_calls[0].wait_ended(2) == "client_disconnected"


async def test_a_finished_reply_leaves_the_connection_for_the_next_one(fake: FakeOpenAI, connect: Callable[..., ChatClient]) -> None:
    client = connect()
    for _ in range(3):
        assert "".join(await deltas(client)) == ChatScript().reply
    assert [c.outcome for c in fake.chat_calls] == ["completed"] * 3
    assert len({c.peer for c in fake.chat_calls}) == 1  # one connection, kept alive
