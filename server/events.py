"""A session's events, published once and read by every listener (the ``/humanecho``
WebSocket today; server-sent events and others later).

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


@dataclass(frozen=True)
class Queued:
    kind: ClassVar[str] = "queued"
    utterance: str
    text: str | None
    source: Literal["text", "audio"]


@dataclass(frozen=True)
class SpeakingStarted:
    """The utterance's first frame went out (not: was queued)."""

    kind: ClassVar[str] = "speaking_started"
    utterance: str
    latency_ms: float  # from queued to the first frame


@dataclass(frozen=True)
class SpeakingEnded:
    """The utterance's last frame went out, or it was cut off, or it never started."""

    kind: ClassVar[str] = "speaking_ended"
    utterance: str
    interrupted: bool = False
    empty: bool = False  # the text produced no audio
    error: bool = False  # synthesis failed before any audio

    def fields(self) -> dict[str, Any]:
        # empty and error are rare: only present when they hold
        out: dict[str, Any] = {"utterance": self.utterance, "interrupted": self.interrupted}
        if self.empty:
            out["empty"] = True
        if self.error:
            out["error"] = True
        return out


@dataclass(frozen=True)
class ErrorEvent:
    kind: ClassVar[str] = "error"
    code: int
    msg: str
    utterance: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "msg": self.msg}
        if self.utterance is not None:
            out["utterance"] = self.utterance
        return out


@dataclass(frozen=True)
class Closed:
    kind: ClassVar[str] = "closed"


SessionEvent: TypeAlias = Queued | SpeakingStarted | SpeakingEnded | ErrorEvent | Closed
EventJson: TypeAlias = dict[str, Any]


def to_json(event: SessionEvent, session_id: str, t: float) -> EventJson:
    fields = event.fields() if isinstance(event, (SpeakingEnded, ErrorEvent)) else asdict(event)
    return {"event": event.kind, "sessionid": session_id, "t": round(t, 3), **fields}


class Subscription:
    """One listener's events, in order, from the moment it subscribed until ``closed``
    (included); ``async for`` reads them. ``close`` stops listening."""

    def __init__(self, owner: SessionEvents) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[EventJson] = asyncio.Queue(maxsize=LISTENER_QUEUE)
        self._done = False

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
        self._listeners: set[Subscription] = set()

    def publish(self, event: SessionEvent) -> None:
        if self._observer is not None:
            self._observer(event)
        message = to_json(event, self.session_id, self._clock())
        for listener in list(self._listeners):
            listener.deliver(message)

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._listeners.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._listeners.discard(subscription)
