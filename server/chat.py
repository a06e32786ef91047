"""Chat through any OpenAI-compatible chat-completions endpoint, streamed sentence by sentence.

``POST {base_url}/chat/completions`` with ``stream: true`` answers server-sent events,
``data: {json}`` lines whose ``choices[0].delta.content`` carry the reply, then
``data: [DONE]``. OpenAI, llama.cpp's server, vLLM and Ollama's ``/v1`` all speak it.

- ``ChatClient.reply`` yields the text deltas; ``ChatClient.replies`` yields each sentence
  as soon as it ends, with the reply so far, so the avatar starts speaking after the first
  sentence and a transcript can follow the stream.
- Every failure is a ``ChatError`` saying what went wrong (unreachable, HTTP status with
  the server's own message, malformed or broken stream, a stall past a timeout). Nothing
  waits without a bound.
- Leaving the stream early (an interrupt cancels the consumer, or it stops iterating and
  closes the generator) closes the HTTP connection: the server sees the disconnect and
  stops generating.
- ``ChatHistory`` keeps a session's last turns; a reply cut off by an interrupt is kept
  as what was actually said (see ``ChatHistory.revise``).
- ``SentenceSplitter`` turns deltas into speakable sentences (markdown, code blocks and
  reasoning blocks are not read aloud).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import aiohttp

from tts.openai_speech import check_base_url, read_error_body, server_error_message
from tts.sentences import FIRST_PIECE_LONG, FIRST_PIECE_MIN, _cut_point, _ends_with_abbreviation

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly digital human talking with someone in a live video call. Your words are "
    "spoken aloud, so answer in short, natural spoken sentences. Do not use markdown, lists, "
    "tables, code, emoji or links unless you are asked for them."
)

ChatErrorKind = Literal["unreachable", "http", "timeout", "stalled", "broken", "malformed", "server"]


class ChatError(RuntimeError):
    """The chat model could not answer. ``kind`` says how (for mapping to a status code),
    ``status`` is the server's HTTP status when it sent one; the message says what to do."""

    def __init__(self, message: str, *, kind: ChatErrorKind, status: int | None = None) -> None:
        super().__init__(message)
        self.kind: ChatErrorKind = kind
        self.status = status


@dataclass(frozen=True)
class ChatConfig:
    """Where and how to chat. ``base_url`` is the API root as OpenAI's SDKs take it
    (``https://api.openai.com/v1``, ``http://127.0.0.1:8080/v1`` for llama.cpp,
    ``http://127.0.0.1:11434/v1`` for Ollama, ``http://127.0.0.1:8000/v1`` for vLLM).
    An empty ``model`` is left out of the request (llama.cpp serves the model it loaded)."""

    base_url: str
    model: str = ""
    api_key: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_history_turns: int = 8
    connect_timeout_s: float = 5.0
    # From sending the request to the first word: a local model reading a long prompt
    # on a CPU may take a while before it says anything.
    first_token_timeout_s: float = 60.0
    # Between two chunks once the reply has started.
    chunk_timeout_s: float = 20.0
    temperature: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        check_base_url(self.base_url, "chat")
        for name in ("connect_timeout_s", "first_token_timeout_s", "chunk_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"chat {name} must be positive, got {getattr(self, name)}")
        if self.max_history_turns < 0:
            raise ValueError(f"chat max_history_turns must be 0 or more, got {self.max_history_turns}")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"chat temperature must be between 0 and 2, got {self.temperature}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"chat max_tokens must be positive, got {self.max_tokens}")

    def __repr__(self) -> str:  # the key stays out of logs
        key = "***" if self.api_key else None
        return f"ChatConfig(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    @property
    def url(self) -> str:
        return f"{check_base_url(self.base_url, 'chat')}/chat/completions"


# --- history -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTurn:
    user: str
    reply: str
    interrupted: bool = False


class ChatHistory:
    """One session's conversation: the last ``max_turns`` exchanges (and at most
    ``max_chars`` of them, oldest dropped first, so a small local model's context is not
    overrun); the system prompt is added when the request is built.

    A turn is a user message and the reply together, so the messages always alternate
    user/assistant, which strict chat templates (llama.cpp's Mistral ones) require.

    A reply cut off by an interrupt is stored as what was actually said, followed by
    ``interrupted_marker``: the user never heard the rest, and a model told it said
    the rest would refer to it ("as I said...") or not repeat it. The marker (an
    ellipsis, how transcripts show speech that broke off) tells the model it was cut off
    without teaching it a bracketed tag to parrot in its own replies.
    """

    def __init__(self, max_turns: int = 8, *, max_chars: int | None = 12_000, interrupted_marker: str = " …") -> None:
        if max_turns < 0:
            raise ValueError(f"max_turns must be 0 or more, got {max_turns}")
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.interrupted_marker = interrupted_marker
        self._turns: deque[tuple[int, ChatTurn]] = deque(maxlen=max_turns)
        self._next = 0

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def turns(self) -> tuple[ChatTurn, ...]:
        return tuple(turn for _, turn in self._turns)

    def add(self, user: str, reply: str, *, interrupted: bool = False) -> int:
        """Keep an exchange; returns its number, for ``revise``."""
        number = self._next
        self._next += 1
        self._turns.append((number, ChatTurn(user, reply.strip(), interrupted)))
        return number

    def revise(self, number: int, spoken: str) -> bool:
        """Turn ``number``'s reply was interrupted after ``spoken`` was said: keep only
        that, marked. False when the turn has already been dropped."""
        for i, (n, turn) in enumerate(self._turns):
            if n == number:
                self._turns[i] = (n, ChatTurn(turn.user, spoken.strip(), interrupted=True))
                return True
        return False

    def clear(self) -> None:
        self._turns.clear()

    def messages(self, system_prompt: str, user_text: str) -> list[dict[str, str]]:
        """The request's ``messages``: system prompt, the kept turns, the new user text."""
        turns = self.turns
        if self.max_chars is not None:
            sizes = [len(t.user) + len(t.reply) for t in turns]
            while turns and sum(sizes) > self.max_chars:
                turns, sizes = turns[1:], sizes[1:]
        out = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for turn in turns:
            reply = turn.reply
            if turn.interrupted:
                reply = (reply + self.interrupted_marker).strip()
            out.append({"role": "user", "content": turn.user})
            out.append({"role": "assistant", "content": reply})
        out.append({"role": "user", "content": user_text})
        return out


# --- sentences -----------------------------------------------------------------------

# A sentence end is confirmed only once the whitespace after it has arrived: "3." may
# yet become "3.14", "Well.." may become an ellipsis. A newline ends a sentence at once.
_END = re.compile(r"[.!?;…]+[\"'”’)\]*_`]*(?=\s)|[。！？；]+[」』”’）)\"']*|\n")
_FENCE = re.compile(r"(?m)^[ \t]{0,3}(```|~~~)")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"  # reasoning models (DeepSeek-R1, Qwen3) think in the content
_LIST_MARKER = re.compile(r"\s*(?:[-*+•]\s+)?(?:\d{1,3}|[A-Za-z])")  # "1." "b." opening a list item
_INITIAL = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]|[A-HJ-Z]")  # "U.S." "J." (not "I.")
_LAST_WORD = re.compile(r"(\S+)$")

# Markdown a voice should not read.
_LINE_MARKUP = re.compile(r"^(?:#{1,6}\s+|>\s?|[-*+•]\s+)+")
# "1. Mix the flour" is read "1, Mix the flour": one piece for the voice, where "1."
# would be cut off by the TTS's own splitter and said alone.
_LIST_NUMBER = re.compile(r"^(\d{1,3})[.)]\s+")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_EMPHASIS = re.compile(r"\*\*|__|~~|`|(?<!\w)[*_](?=\w)|(?<=\w)[*_](?!\w)")
_TABLE_RULE = re.compile(r"[\s|:\-]+")
_EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\ufe0f\u200d]")
_SPACE_BEFORE_MARK = re.compile(r"\s+([.,!?;:])(?=\s|$)")  # left where an emoji was: "Done 😀."
_WORDY = re.compile(r"\w")


def speakable(raw: str) -> str:
    """A sentence of model output as it should be read aloud: markdown markers, links'
    targets, table rules and emoji removed; "" when nothing speakable is left."""
    text = _LIST_NUMBER.sub(r"\1, ", _LINE_MARKUP.sub("", raw.strip()))
    if text.startswith("|"):
        if _TABLE_RULE.fullmatch(text):
            return ""
        text = ", ".join(cell.strip() for cell in text.strip("|").split("|"))
    text = _LINK.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _EMOJI.sub("", text)
    text = _SPACE_BEFORE_MARK.sub(r"\1", " ".join(text.split()))
    return text if _WORDY.search(text) else ""


class SentenceSplitter:
    """Streamed text in, speakable sentences out as soon as each one ends.

    Sentence ends follow ``tts.sentences`` (abbreviations such as "Dr." and decimals such
    as 3.14 do not end one; newlines do); list markers ("1.") and initials ("J. R. R.")
    do not end one either. A sentence that runs past ``max_chars`` is cut at a clause or a
    space; the first one is cut at a late comma once it is long, so speech starts sooner.
    Fenced code blocks and ``<think>`` blocks are not read: code read aloud helps nobody.
    ``text`` is the reply as a transcript shows it (code kept, reasoning left out).
    """

    def __init__(self, max_chars: int = 200) -> None:
        if max_chars < 20:
            raise ValueError(f"max_chars must be at least 20, got {max_chars}")
        self.max_chars = max_chars
        self._buf = ""  # text not yet emitted
        self._mode: Literal["text", "code", "think"] = "text"
        self._shown: list[str] = []  # transcript text already consumed from _buf
        self._emitted = 0

    @property
    def text(self) -> str:
        pending = "" if self._mode == "think" else self._buf
        return ("".join(self._shown) + pending).strip()

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        return list(self._drain(final=False))

    def flush(self) -> list[str]:
        """The rest, at the end of the stream."""
        return list(self._drain(final=True))

    def _drain(self, final: bool) -> Iterator[str]:
        while self._buf:
            if self._mode == "think":
                end = self._buf.find(_THINK_CLOSE)
                if end < 0:
                    self._buf = "" if final else self._buf[-(len(_THINK_CLOSE) - 1) :]
                    return
                self._buf = self._buf[end + len(_THINK_CLOSE) :]
                self._mode = "text"
            elif self._mode == "code":
                close = _FENCE.search(self._buf)
                line_end = self._buf.find("\n", close.end()) if close else -1
                if close is None or (line_end < 0 and not final):
                    # Keep only the unfinished line: it may be the closing fence.
                    cut = self._buf.rfind("\n") + 1
                    self._consume(cut)
                    if final:
                        self._consume(len(self._buf))
                    return
                self._consume(line_end + 1 if line_end >= 0 else len(self._buf))
                self._mode = "text"
            else:
                piece = self._next_piece(final)
                if piece is None:
                    return
                spoken = speakable(piece)
                if spoken:
                    self._emitted += 1
                    yield spoken

    def _next_piece(self, final: bool) -> str | None:
        """Take the next piece off the buffer in text mode: a finished sentence, the text
        before a code or think block, or "" when a block opens. None: wait for more."""
        buf = self._buf
        think = buf.find(_THINK_OPEN)
        fence = _FENCE.search(buf)
        block = min(i for i in (think, fence.start() if fence else -1, len(buf)) if i >= 0)
        end = self._sentence_end(buf, block)
        if end is None and block < len(buf):
            end = block  # the text before a block is a sentence of its own
        if end:
            self._consume(end)
            return buf[:end]
        if think == 0:
            self._buf = buf[len(_THINK_OPEN) :]
            self._mode = "think"
            return ""
        if block == 0:  # a fence opens: skip its line ("```python")
            line_end = buf.find("\n")
            if line_end < 0 and not final:
                return None
            self._consume(line_end + 1 if line_end >= 0 else len(buf))
            self._mode = "code"
            return ""
        if final:
            self._consume(len(buf))
            return buf
        cut = self._long_cut(buf)
        if cut:
            self._consume(cut)
            return buf[:cut]
        return None

    def _sentence_end(self, buf: str, stop: int) -> int | None:
        for match in _END.finditer(buf, 0, stop):
            if match.group().startswith(".") and not match.group().startswith(".."):
                before = buf[: match.start()]
                if _LIST_MARKER.fullmatch(before) or _ends_with_abbreviation(before) or _ends_with_initial(before):
                    continue
            return match.end()
        return None

    def _long_cut(self, buf: str) -> int:
        """Where to cut a sentence that has not ended yet but is already long; 0: not yet."""
        if self._emitted == 0 and len(buf) > FIRST_PIECE_LONG:
            for i in range(FIRST_PIECE_MIN, len(buf) - 1):
                if buf[i] in ",，、" and buf[i + 1].isspace():
                    return i + 1
        if len(buf) > self.max_chars:
            return _cut_point(buf, self.max_chars)
        return 0

    def _consume(self, n: int) -> None:
        self._shown.append(self._buf[:n])
        self._buf = self._buf[n:]


def _ends_with_initial(before_period: str) -> bool:
    match = _LAST_WORD.search(before_period)
    return match is not None and _INITIAL.fullmatch(match.group(1).lstrip("\"'“‘([{")) is not None


# --- the client ----------------------------------------------------------------------


class ReplyPart(NamedTuple):
    """One step of a streamed reply: a finished, speakable ``sentence`` ("" for a
    progress-only step) and the reply ``text`` so far, as a transcript shows it."""

    sentence: str
    text: str


class ChatClient:
    """Streams replies from ``config``'s endpoint. One client serves every session: it
    holds one connection pool (``close`` it at shutdown); each session has its own
    ``ChatHistory``."""

    def __init__(self, config: ChatConfig, *, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self._session = session
        self._owns_session = session is None

    def new_history(self) -> ChatHistory:
        """An empty history for a new session, as long as the configuration says."""
        return ChatHistory(self.config.max_history_turns)

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def replies(
        self, history: ChatHistory | None, user_text: str, *, progress: bool = False
    ) -> AsyncGenerator[ReplyPart, None]:
        """Each sentence of the reply as soon as it ends, with the reply so far. With
        ``progress``, also a ``ReplyPart("", text)`` for each delta that ends no sentence,
        for a transcript that follows word by word. ``history`` is read, not changed:
        the caller adds the turn once it knows what was said (see ``ChatHistory``)."""
        splitter = SentenceSplitter()
        async with contextlib.aclosing(self.reply(history, user_text)) as deltas:
            async for delta in deltas:
                sentences = splitter.feed(delta)
                for sentence in sentences:
                    yield ReplyPart(sentence, splitter.text)
                if progress and not sentences:
                    yield ReplyPart("", splitter.text)
        for sentence in splitter.flush():
            yield ReplyPart(sentence, splitter.text)
        if progress:
            yield ReplyPart("", splitter.text)

    async def reply(self, history: ChatHistory | None, user_text: str) -> AsyncGenerator[str, None]:
        """The reply's text deltas as the model streams them."""
        config = self.config
        messages = (history or ChatHistory(0)).messages(config.system_prompt, user_text)
        body: dict[str, Any] = {"messages": messages, "stream": True}
        if config.model:
            body["model"] = config.model
        if config.temperature is not None:
            body["temperature"] = config.temperature
        if config.max_tokens is not None:
            body["max_tokens"] = config.max_tokens
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + config.first_token_timeout_s
        response = await self._open(body)
        finished = False
        try:
            if response.status >= 400:
                raise await self._http_error(response)
            if response.content_type == "application/json":
                # A server (or a proxy) that ignored stream: true answers in one piece.
                yield await self._whole_reply(response, deadline - loop.time())
            else:
                first_token: float | None = None
                chars = 0
                async for chunk in self._chunks(response, deadline):
                    content = _delta_content(chunk)
                    if content:
                        if first_token is None:
                            first_token = loop.time()
                        chars += len(content)
                        yield content
                log.info(
                    "chat reply from %s: %d characters in %.2f s (first word after %.2f s)",
                    config.model or config.base_url, chars, loop.time() - started,
                    (first_token or loop.time()) - started,
                )  # fmt: skip
            finished = True
        finally:
            # Left early (an interrupt, a stop, an error): close the connection rather
            # than return it to the pool, so the server sees the disconnect and stops
            # generating. A finished response goes back to the pool.
            if finished:
                response.release()
            else:
                response.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = self.config.connect_timeout_s
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_connect=timeout))
            self._owns_session = True
        return self._session

    async def _open(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        config = self.config
        headers = {"Accept": "text/event-stream"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"

        async def post() -> aiohttp.ClientResponse:
            return await self._client().post(config.url, json=body, headers=headers)

        try:
            return await asyncio.wait_for(post(), config.first_token_timeout_s)
        except aiohttp.ClientConnectorError as exc:
            raise ChatError(
                f"cannot reach the chat server at {config.base_url} ({exc.os_error or exc}): is it running, and is base_url right?",
                kind="unreachable",
            ) from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError) and not isinstance(exc, aiohttp.ClientError):
                raise self._timeout_error() from exc
            # aiohttp's connect timeout is both a TimeoutError and a ClientError.
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ChatError(f"cannot reach the chat server at {config.base_url} ({detail})", kind="unreachable") from exc

    def _timeout_error(self) -> ChatError:
        config = self.config
        return ChatError(
            f"the chat model ({config.model or 'default'} at {config.base_url}) said nothing within "
            f"{config.first_token_timeout_s:g} s: it is overloaded or too slow; raise first_token_timeout_s",
            kind="timeout",
        )

    async def _http_error(self, response: aiohttp.ClientResponse) -> ChatError:
        status = response.status
        detail = server_error_message(await read_error_body(response)) or "no detail"
        hint = {
            401: "check the chat API key",
            403: "check the chat API key and its permissions",
            404: "check base_url (OpenAI-style servers answer at .../v1/chat/completions, so it usually ends in /v1) and the model name",
            429: "the chat server is rate limiting or out of quota",
        }.get(status, "the chat server failed" if status >= 500 else "the chat server refused the request")
        return ChatError(
            f"the chat server answered {status} {response.reason or ''}: {detail} ({hint})".replace("  ", " "),
            kind="http",
            status=status,
        )

    async def _whole_reply(self, response: aiohttp.ClientResponse, wait: float) -> str:
        try:
            data = json.loads(await asyncio.wait_for(response.text(), max(wait, 0.0)))
            content = data["choices"][0]["message"]["content"]
        except asyncio.TimeoutError as exc:
            raise self._timeout_error() from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ChatError(f"the chat server's answer broke off ({type(exc).__name__}: {exc})", kind="broken") from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ChatError("the chat server answered JSON that is not a chat completion", kind="malformed") from exc
        return content if isinstance(content, str) else ""

    async def _chunks(self, response: aiohttp.ClientResponse, deadline: float) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's JSON chunks, until ``[DONE]``. The model must start (a word, or a
        thought from a reasoning model) by ``deadline`` (loop time); after that each read
        waits at most chunk_timeout_s."""
        config = self.config
        loop = asyncio.get_running_loop()
        data: list[str] = []  # the data lines of the event being read
        finish_reason: str | None = None
        chunks = 0
        started = False
        while True:
            left = None if started else deadline - loop.time()
            try:
                line = await asyncio.wait_for(response.content.readline(), config.chunk_timeout_s if left is None else max(left, 0.0))
            except asyncio.TimeoutError as exc:
                if left is not None:
                    raise self._timeout_error() from exc
                raise ChatError(
                    f"the chat stream stalled: nothing for {config.chunk_timeout_s:g} s after {chunks} chunks", kind="stalled"
                ) from exc
            except (aiohttp.ClientError, OSError) as exc:
                raise ChatError(f"the chat stream broke off after {chunks} chunks ({type(exc).__name__}: {exc})", kind="broken") from exc
            except ValueError as exc:  # a line past the reader's limit
                raise ChatError(f"the chat stream sent an overlong line ({exc})", kind="malformed") from exc
            ended = not line  # the end of the body: an event still open there counts
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith(":"):
                continue  # an SSE comment: a keep-alive
            if text.startswith("data:"):
                data.append(text[5:].removeprefix(" "))
                continue
            if text or not data:  # "event:", "id:", "retry:" fields, or a blank line between events
                if ended:
                    break
                continue
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                return
            chunk = _parse_chunk(payload)
            chunks += 1
            reason = _finish_reason(chunk)
            if reason == "length":
                log.warning("the chat reply was cut at max_tokens (%s)", config.max_tokens)
            finish_reason = reason or finish_reason
            started = started or bool(_delta_content(chunk)) or _is_thinking(chunk)
            yield chunk
            if ended:
                break
        # The body ended without [DONE]: complete if the model said it had finished.
        if finish_reason is None:
            if chunks == 0 and response.content_type != "text/event-stream":
                raise ChatError(
                    f"the chat server answered {response.content_type}, not a stream of events: "
                    f"is {config.base_url} an OpenAI-compatible API?",
                    kind="malformed",
                )
            raise ChatError(
                f"the chat stream ended after {chunks} chunks without finishing the reply "
                "(no finish_reason, no [DONE]): the server dropped it",
                kind="broken",
            )


def _parse_chunk(payload: str) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except ValueError as exc:
        raise ChatError(f"the chat stream sent a line that is not JSON: {payload[:120]!r}", kind="malformed") from exc
    if not isinstance(chunk, dict):
        raise ChatError(f"the chat stream sent {type(chunk).__name__} where a chunk object belongs", kind="malformed")
    if "error" in chunk:  # vLLM and llama.cpp report failures mid-stream this way
        raise ChatError(f"the chat server failed mid-reply: {server_error_message(payload)}", kind="server")
    return chunk


def _choice(chunk: dict[str, Any]) -> dict[str, Any]:
    choices = chunk.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _delta_content(chunk: dict[str, Any]) -> str:
    """The reply text a chunk carries (``reasoning_content`` is thinking, not said)."""
    delta = _choice(chunk).get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def _is_thinking(chunk: dict[str, Any]) -> bool:
    """A reasoning model's thought (llama.cpp's and vLLM's ``reasoning_content``, Ollama's
    ``reasoning``): not said, but the model is at work."""
    delta = _choice(chunk).get("delta")
    return isinstance(delta, dict) and bool(delta.get("reasoning_content") or delta.get("reasoning"))


def _finish_reason(chunk: dict[str, Any]) -> str | None:
    reason = _choice(chunk).get("finish_reason")
    return reason if isinstance(reason, str) else None
