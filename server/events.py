"""A session's events, published once and read by every listener (the ``/humanecho``
WebSocket, ``GET /events`` as server-sent events, and roles in the server that ``watch``).

Each event is a small frozen dataclass; on the wire it is one JSON object
``{"event": kind, "sessionid": ..., "t": unix seconds, ...fields}``. A listener that
stops reading loses its oldest events, never the session.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, TypeAlias

LISTENER_QUEUE = 1000  # events a slow listener may fall behind by before it loses the oldest


def _without_none(fields: dict[str, Any], *optional: str) -> dict[str, Any]:
    """``fields`` less the ``optional`` ones that are None: rare fields appear only when they hold."""
    return {k: v for k, v in fields.items() if not (k in optional and v is None)}


@dataclass(frozen=True)
class Queued:
    kind: ClassVar[str] = "queued"
    utterance: str
    text: str | None
    source: Literal["text", "audio", "stream"]  # stream: a segment of /audio_stream
    reply: str | None = None  # the chat reply this sentence belongs to

    def fields(self) -> dict[str, Any]:
        return _without_none(asdict(self), "reply")


@dataclass(frozen=True)
class SpeakingStarted:
    """The utterance's first frame went out to the peer (the track handed it over), not: was queued."""

    kind: ClassVar[str] = "speaking_started"
    utterance: str
    latency_ms: float  # from queued to the first frame
    text: str | None = None  # None: uploaded audio
    reply: str | None = None

    def fields(self) -> dict[str, Any]:
        return _without_none(asdict(self), "reply")


@dataclass(frozen=True)
class SpeakingEnded:
    """The utterance's last frame went out, or it was cut off, or it never started."""

    kind: ClassVar[str] = "speaking_ended"
    utterance: str
    interrupted: bool = False
    empty: bool = False  # the text produced no audio
    error: bool = False  # synthesis failed before any audio
    text: str | None = None
    reply: str | None = None

    def fields(self) -> dict[str, Any]:
        # empty and error are rare: only present when they hold
        out: dict[str, Any] = {"utterance": self.utterance, "text": self.text, "interrupted": self.interrupted}
        if self.empty:
            out["empty"] = True
        if self.error:
            out["error"] = True
        if self.reply is not None:
            out["reply"] = self.reply
        return out


@dataclass(frozen=True)
class ReplyText:
    """A chat reply as it streams: ``text`` is the reply so far (as a transcript shows it);
    the last one of a reply has ``done`` (and says whether it was cut off or failed)."""

    kind: ClassVar[str] = "reply_text"
    reply: str
    text: str
    done: bool = False
    interrupted: bool = False
    error: bool = False

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reply": self.reply, "text": self.text, "done": self.done}
        if self.done:
            out.update(interrupted=self.interrupted, error=self.error)
        return out


@dataclass(frozen=True)
class ErrorEvent:
    kind: ClassVar[str] = "error"
    code: int
    msg: str
    utterance: str | None = None
    reply: str | None = None

    def fields(self) -> dict[str, Any]:
        return _without_none(asdict(self), "utterance", "reply")


@dataclass(frozen=True)
class Closed:
    kind: ClassVar[str] = "closed"

    def fields(self) -> dict[str, Any]:
        return {}


SessionEvent: TypeAlias = Queued | SpeakingStarted | SpeakingEnded | ReplyText | ErrorEvent | Closed
EventJson: TypeAlias = dict[str, Any]
Watcher: TypeAlias = Callable[[SessionEvent], None]
EVENT_KINDS = tuple(cls.kind for cls in (Queued, SpeakingStarted, SpeakingEnded, ReplyText, ErrorEvent, Closed))


def to_json(event: SessionEvent, session_id: str, t: float) -> EventJson:
    return {"event": event.kind, "sessionid": session_id, "t": round(t, 3), **event.fields()}


class Subscription:
    """One listener's events, in order, from the moment it subscribed until ``closed``
    (included); ``async for`` reads them. ``close`` stops listening."""

    def __init__(self, owner: SessionEvents) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[EventJson] = asyncio.Queue(maxsize=LISTENER_QUEUE)
        self._done = False

    @property
    def session_id(self) -> str:
        return self._owner.session_id

    def deliver(self, message: EventJson) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(message)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> EventJson:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event["event"] == Closed.kind:
            self._done = True
            self.close()
        return event

    def close(self) -> None:
        self._owner.unsubscribe(self)


class SessionEvents:
    """Publish/subscribe for one session."""

    def __init__(
        self, session_id: str, clock: Callable[[], float] = time.time, observer: Callable[[SessionEvent], None] | None = None
    ) -> None:
        self.session_id = session_id
        self._clock = clock
        self._observer = observer  # sees every event (the server's metrics)
        self._watchers: list[Watcher] = []
        self._listeners: set[Subscription] = set()

    def publish(self, event: SessionEvent) -> None:
        if self._observer is not None:
            self._observer(event)
        for watcher in list(self._watchers):
            watcher(event)
        message = to_json(event, self.session_id, self._clock())
        for listener in list(self._listeners):
            listener.deliver(message)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._listeners.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._listeners.discard(subscription)

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with each event as it is published (a role of the session that
        follows its own speech, in step with it); returns what stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher) if watcher in self._watchers else None
