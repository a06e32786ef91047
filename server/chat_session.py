"""A session's conversation with the chat model: ``POST /human`` and the WebSocket with
``type: "chat"``.

Each message starts a *reply*: the model's answer streamed from the shared ``ChatClient``,
its text published as ``reply_text`` events as it grows, and each finished sentence
spoken at once as an utterance of its own (through the session's normal speech path, so
the first sentence plays while the model is still writing the rest).

- **Interrupts.** The session's interrupt (``/interrupt_talk``, ``interrupt`` on a message)
  cuts the reply: its stream is cancelled, which closes the HTTP connection, so the model
  stops generating, and its speech stops with the rest of the session's.
- **A new message while a reply is still streaming or being spoken** cuts that reply
  first, as a person who is spoken over stops and listens; the new one is answered with
  the cut one in the history. Queueing would have the avatar finish an answer the user
  has already moved on from.
- **History.** Bounded per session (``ChatHistory``: the configured number of turns).
  A reply is kept as the model wrote it once its stream ends; one cut off (while
  streaming, or later while its sentences were still being spoken) is kept as what was
  actually said: the sentences whose speech had started.
- **Failures** (unreachable, refused, stalled, broken) are an ``error`` event with the
  model's message and a final ``reply_text`` with ``error``; what was already queued is
  still spoken and the session goes on.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from server.chat import ChatClient, ChatError
from server.errors import ErrorCode, LipSyncError, TooManyRequests
from server.events import ErrorEvent, ReplyText, SessionEvent, SessionEvents, SpeakingEnded, SpeakingStarted

log = logging.getLogger(__name__)

ROOM_POLL_S = 0.25  # a full speech queue is asked again this often (the model's stream waits meanwhile)

Say = Callable[[str, str | None, str], str]  # (sentence, voice, reply id) -> utterance id


class ChatFailed(LipSyncError):
    """The chat model could not answer (502), or not in time (504)."""

    default_code = ErrorCode.CHAT_FAILED


def chat_error(exc: ChatError) -> ChatFailed:
    code = ErrorCode.CHAT_TIMEOUT if exc.kind in ("timeout", "stalled") else ErrorCode.CHAT_FAILED
    return ChatFailed(str(exc), code)


@dataclass(eq=False)
class Reply:
    """One answer of the model, from the message that asked for it until it has been said."""

    id: str
    user_text: str
    voice: str | None
    text: str = ""  # the reply so far, as a transcript shows it
    sentences: dict[str, str] = field(default_factory=dict)  # utterance id -> sentence, in order
    heard: set[str] = field(default_factory=set)  # utterances whose speech started
    ended: set[str] = field(default_factory=set)  # utterances that ended, however
    streamed: bool = False  # the model finished writing it
    turn: int | None = None  # its number in the history, once kept
    task: asyncio.Task[None] | None = None
    first: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        # Read by POST /human only; a WebSocket message never awaits it.
        self.first.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def in_progress(self) -> bool:
        """Still being written, or still being said."""
        streaming = self.task is not None and not self.task.done()
        return streaming or any(u not in self.ended for u in self.sentences)

    def said(self) -> str:
        """What the listener heard: the sentences whose speech started, in order."""
        return " ".join(s for u, s in self.sentences.items() if u in self.heard)

    def settle(self, error: BaseException | None = None) -> None:
        if not self.first.done():
            if error is None:
                self.first.set_result(None)
            else:
                self.first.set_exception(error)


class ChatRole:
    """One session's chat: its history and the reply in progress."""

    def __init__(self, session_id: str, client: ChatClient, events: SessionEvents, say: Say,
                 interrupt: Callable[[], object], keep: Callable[[asyncio.Task[None]], None]) -> None:
        self.session_id = session_id
        self.client = client
        self.history = client.new_history()
        self._events = events
        self._say = say
        self._interrupt = interrupt  # the session's: cuts all speech, and this role's reply with it
        self._keep = keep
        self._lock = asyncio.Lock()  # one reply streams at a time, so history turns stay in order
        self._counter = 0
        self._current: Reply | None = None
        self._closed = False
        self._unwatch = events.watch(self._on_event)

    @property
    def current(self) -> Reply | None:
        return self._current

    def start(self, user_text: str, voice: str | None = None, interrupt: bool = False) -> Reply:
        """Ask the model; the reply streams and is spoken in the background. A reply still in
        progress is cut first (so is all speech with ``interrupt``)."""
        if interrupt or (self._current is not None and self._current.in_progress):
            self._interrupt()
        self._counter += 1
        reply = Reply(f"{self.session_id}-r{self._counter}", user_text, voice)
        self._current = reply
        reply.task = asyncio.ensure_future(self._run(reply))
        self._keep(reply.task)
        return reply

    async def wait_first(self, reply: Reply, timeout: float) -> bool:
        """Wait until the model has started answering (True), or ``timeout`` passed (False);
        ``ChatFailed`` when it failed first."""
        try:
            await asyncio.wait_for(asyncio.shield(reply.first), timeout)
        except asyncio.TimeoutError:
            return False
        except ChatError as exc:
            raise chat_error(exc) from None
        except asyncio.CancelledError:
            if reply.first.cancelled():  # cut before it started: not this request's failure
                return False
            raise
        return True

    def cut(self) -> None:
        """The session was interrupted: stop the reply's stream; a reply already written but
        still being said is kept in the history as what was said."""
        reply = self._current
        if reply is None:
            return
        if reply.task is not None and not reply.task.done():
            reply.task.cancel()  # its handler keeps the turn
        elif reply.turn is not None and any(u not in reply.ended for u in reply.sentences):
            self.history.revise(reply.turn, reply.said())

    def close(self) -> None:
        self._closed = True
        self._unwatch()
        if self._current is not None and self._current.task is not None:
            self._current.task.cancel()

    # ---- the reply ----
    async def _run(self, reply: Reply) -> None:
        # Each handler keeps the turn before its first await, so the next reply (waiting
        # for the lock) always reads a history that has this one.
        try:
            async with self._lock:
                await self._stream(reply)
            reply.turn = self.history.add(reply.user_text, reply.text)
            self._publish(ReplyText(reply.id, reply.text, done=True))
        except asyncio.CancelledError:
            reply.turn = self.history.add(reply.user_text, reply.said(), interrupted=True)
            reply.first.cancel()
            self._publish(ReplyText(reply.id, reply.text, done=True, interrupted=True))
            raise
        except (ChatError, LipSyncError) as exc:
            # What was queued is still said: keep the reply as written so far, marked cut.
            reply.turn = self.history.add(reply.user_text, " ".join(reply.sentences.values()), interrupted=True)
            failure = chat_error(exc) if isinstance(exc, ChatError) else exc
            log.warning("session %s: chat reply %s failed: %s", self.session_id, reply.id, failure.msg)
            reply.settle(exc)
            self._publish(ErrorEvent(int(failure.code), failure.msg, reply=reply.id))
            self._publish(ReplyText(reply.id, reply.text, done=True, error=True))
        finally:
            reply.settle()

    async def _stream(self, reply: Reply) -> None:
        shown = ""
        async with contextlib.aclosing(self.client.replies(self.history, reply.user_text, progress=True)) as parts:
            async for sentence, text in parts:
                reply.settle()
                reply.text = text
                if text != shown:
                    shown = text
                    self._publish(ReplyText(reply.id, text))
                if sentence:
                    utterance = await self._speak(sentence, reply)
                    reply.sentences[utterance] = sentence
        reply.streamed = True

    async def _speak(self, sentence: str, reply: Reply) -> str:
        """Queue ``sentence``; while the session's speech queue is full, wait (and so read the
        model's stream no further) rather than drop it."""
        while True:
            try:
                return self._say(sentence, reply.voice, reply.id)
            except TooManyRequests:
                await asyncio.sleep(ROOM_POLL_S)

    def _on_event(self, event: SessionEvent) -> None:
        reply = self._current
        if reply is None or getattr(event, "reply", None) != reply.id:
            return
        if isinstance(event, SpeakingStarted):
            reply.heard.add(event.utterance)
        elif isinstance(event, SpeakingEnded):
            reply.ended.add(event.utterance)

    def _publish(self, event: SessionEvent) -> None:
        if not self._closed:
            self._events.publish(event)
