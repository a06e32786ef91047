"""``GET /audio_stream``: streamed audio in over a WebSocket, with LiveKit's avatar semantics.

A voice agent's TTS arrives as raw PCM while the model is still talking. The socket takes
it in pieces, grouped into segments (LiveKit's ``lk.audio_stream`` byte streams), and
answers as LiveKit's avatar protocol does:

* client -> server, text JSON: ``{"type": "format", "sample_rate": 24000, "channels": 1}``
  (s16le always; default 16 kHz mono; 8000..48000 Hz, 1 or 2 channels; may change at
  any time: what came before is resampled to the end with the old format),
  ``{"type": "end_of_segment"}`` (LiveKit's ``AudioSegmentEnd``), ``{"type":
  "clear_buffer"}`` (``lk.clear_buffer``: stop now, drop what is queued); binary: raw
  s16le PCM, interleaved for stereo, any size (a sample split across messages is joined).
* server -> client, text JSON: ``playback_started {segment}`` when a segment's first frame
  goes out to the peer; ``playback_finished {segment, playback_position, interrupted}``
  (``lk.playback_finished``) once per segment, when it has played out or was cut; ``error
  {code, msg}`` for bad input (the socket stays up); ``closed`` when the session ends.

A segment starts with the first binary message after connect, ``end_of_segment`` or
``clear_buffer``; ids are ``"<session>-a<n>"``. Each is an utterance of the session's
speech feeder (so ``queued``/``speaking_started``/``speaking_ended`` fire for it on
``/humanecho`` and ``/events``, with ``source: "stream"``), fed on to the worker as it
arrives and played from the player's start buffer (``SessionPlayer.hold_start``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from media.resample import StreamResampler
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from server.errors import BadRequest, ErrorCode, LipSyncError, TooManyRequests, error_body
from server.events import Closed, SessionEvent, SpeakingEnded, SpeakingStarted
from server.frames import MediaFrame
from server.request import field_int, optional_str, parse_json_object, show
from server.routes import bind_websocket
from server.session import Session
from server.speech import StreamedPcm

log = logging.getLogger(__name__)
MIN_RATE, MAX_RATE = 8_000, 48_000  # the sample rates a stream may declare

routes = web.RouteTableDef()

MAX_MESSAGE_BYTES = 1 << 20  # one binary message: 5.4 s of 48 kHz stereo; a bigger one closes the socket (1009)
MESSAGE_TYPES = ("format", "end_of_segment", "clear_buffer")


@dataclass
class Segment:
    """One segment of this socket, from its first piece until ``playback_finished``."""

    id: str
    source: StreamedPcm
    frames_played: int = 0  # its speaking frames handed to the peer
    cut: bool = False  # stopped by the session (an interrupt): its further pieces are dropped
    overflowed: bool = False  # a piece was refused for the speech limit (said once per segment)

    def position(self, interrupted: bool) -> float:
        """Seconds of its audio played: all of it when it played out; when cut, the frames
        that went out (at most what arrived)."""
        samples = self.source.received
        if interrupted:
            samples = min(samples, self.frames_played * SAMPLES_PER_FRAME)
        return round(samples / SAMPLE_RATE, 3)


class AudioStream:
    """The protocol of one ``/audio_stream`` socket on ``session``: messages in through the
    ``on_*`` methods, events out on ``outbox`` (JSON objects, in order)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._resampler = StreamResampler()
        self._open: Segment | None = None  # the segment receiving audio
        self._refusing = False  # the open segment was refused (a full queue): pieces dropped until its end
        self._segments: dict[str, Segment] = {}  # not finished yet, oldest first
        self._unwatch = session.events.watch(self._on_event)
        session.player.add_sink(self._on_frame)

    # ---- in ----
    def on_text(self, data: str) -> None:
        body = parse_json_object(data, "the JSON message")
        kind = optional_str(body, "type")
        if kind == "format":
            self._format(body)
        elif kind == "end_of_segment":
            self.end_of_segment()
        elif kind == "clear_buffer":
            self.clear_buffer()
        elif kind is None:
            raise BadRequest(f"missing field 'type': one of {', '.join(MESSAGE_TYPES)}", ErrorCode.MISSING_FIELD)
        else:
            raise BadRequest(f"field 'type' must be one of {', '.join(MESSAGE_TYPES)}, got {show(kind)}")

    def _format(self, body: dict[str, Any]) -> None:
        rate = field_int(body, "sample_rate") if body.get("sample_rate") is not None else SAMPLE_RATE
        channels = field_int(body, "channels") if body.get("channels") is not None else 1
        try:
            if not MIN_RATE <= rate <= MAX_RATE:
                raise ValueError(f"sample_rate must be {MIN_RATE}..{MAX_RATE} Hz, got {rate}")
            resampler = StreamResampler(rate, channels)
        except ValueError as exc:
            raise BadRequest(f"{exc} (the audio is s16le; the format stays {self._resampler.rate} Hz, "
                             f"{self._resampler.channels} channel(s))") from None
        if self._open is not None:  # mid-segment: what came before ends with the old filter
            self._push(self._resampler.flush())
        self._resampler = resampler

    def on_audio(self, data: bytes) -> None:
        if self._open is None and not self._refusing:
            try:
                segment, source = self.session.stream_audio()
            except TooManyRequests as exc:
                self._refusing = True
                raise TooManyRequests(f"{exc.msg}; this segment's audio is dropped until end_of_segment") from None
            self._open = Segment(segment, source)
            self._segments[segment] = self._open
            log.info("session %s: segment %s started", self.session.id, segment)
        self._push(self._resampler.feed(data))

    def _push(self, pcm: Any) -> None:
        segment = self._open
        if segment is None or segment.cut or not pcm.size:
            return
        try:
            self.session.feeder.push_stream(segment.source, pcm)
        except TooManyRequests:
            if not segment.overflowed:
                segment.overflowed = True
                raise

    def end_of_segment(self) -> None:
        if self._open is not None:
            self._push(self._resampler.flush())
            self._open.source.end()
        else:
            self._resampler.flush()
        self._open = None
        self._refusing = False

    def clear_buffer(self) -> None:
        """Stop now and drop what is queued, as an interrupt does: each segment of this
        socket not finished yet gets its ``playback_finished`` with ``interrupted``."""
        self._resampler.flush()  # its tail belongs to the audio dropped
        self._open = None
        self._refusing = False
        if self._segments or self.session.feeder.is_speaking:
            self.session.interrupt()

    def close(self) -> None:
        """The socket went away: a segment still open ends with what arrived (what is queued
        plays on; its events still reach ``/events``)."""
        self.end_of_segment()
        self._unwatch()
        self.session.player.remove_sink(self._on_frame)

    # ---- the session's news ----
    def _on_frame(self, frame: MediaFrame) -> None:
        segment = self._segments.get(frame.utterance_id or "")
        if segment is not None:
            segment.frames_played += 1

    def _on_event(self, event: SessionEvent) -> None:
        if isinstance(event, Closed):
            self.outbox.put_nowait({"event": Closed.kind})
            return
        if not isinstance(event, SpeakingStarted | SpeakingEnded):
            return
        segment = self._segments.get(event.utterance)
        if segment is None:
            return
        if isinstance(event, SpeakingStarted):
            self.outbox.put_nowait({"event": "playback_started", "segment": segment.id})
            return
        del self._segments[segment.id]
        if segment is self._open:
            segment.cut = True  # cut while still arriving: the rest of it is dropped
        position = segment.position(event.interrupted)
        log.info("session %s: segment %s finished at %.3f s%s", self.session.id, segment.id, position,
                 " (interrupted)" if event.interrupted else "")
        self.outbox.put_nowait({"event": "playback_finished", "segment": segment.id,
                                "playback_position": position, "interrupted": event.interrupted})


@routes.get("/audio_stream")
async def audio_stream(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=MAX_MESSAGE_BYTES)
    session = await bind_websocket(request, ws)
    if session is None:
        return ws
    stream = AudioStream(session)

    async def forward() -> None:
        while True:
            event = await stream.outbox.get()
            await ws.send_json(event)
            if event["event"] == Closed.kind:
                await ws.close()
                return

    forwarder = asyncio.ensure_future(forward())
    try:
        async for msg in ws:
            if session.closed:
                break
            try:
                if msg.type == WSMsgType.BINARY:
                    stream.on_audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    stream.on_text(msg.data)
            except LipSyncError as exc:
                await ws.send_json({"event": "error", **error_body(exc.code, exc.msg)})
    finally:
        stream.close()
        if session.closed:  # let the last events (and closed) go out
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(asyncio.shield(forwarder), 1.0)
        forwarder.cancel()
    return ws
