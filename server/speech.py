"""The speech feeder: text or audio in, PCM chunks out to the worker, one utterance after
another. It alone owns the session's generation: an interrupt bumps it, and every stage
drops what carries an older one (queued text, TTS in progress here; PCM and features in
the worker, which is told; frames rendered but not shown, in the player, which checks)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np

from media.pcm import Pcm, silence
from media.timing import SAMPLE_RATE
from pipeline.messages import AudioChunk, Interrupt, ToWorker
from server.errors import ErrorCode, TooManyRequests
from server.events import ErrorEvent, Queued, SessionEvents, SpeakingEnded, SpeakingStarted
from tts.base import TTSBackend, TTSError

log = logging.getLogger(__name__)

START_LEAD_FRAMES = 2  # frames between sending speech and its first frame being shown
UPLOAD_CHUNK_SAMPLES = SAMPLE_RATE  # uploaded audio goes to the worker a second at a time
# a streamed segment's first frame waits for the player's start buffer and the engine's
# look-ahead: drawing it this much further along the idle loop keeps the motion continuous
STREAM_LEAD_FRAMES = 2
AHEAD_S = 8.0  # speech sent to the worker but not shown yet: beyond this the feeder waits
AHEAD_POLL_S = 0.05
TEXT_SECONDS_PER_CHAR = 0.08  # a generous estimate of speech per character, to bound queued text


@dataclass(frozen=True)
class SpeechLimits:
    """What one session may have queued; beyond it ``say``/``play`` are refused."""

    utterances: int = 32
    seconds: float = 300.0


DEFAULT_LIMITS = SpeechLimits()


class StreamedPcm:
    """A streamed segment's audio as it arrives (``/audio_stream``): 16 kHz pieces in, read
    by the feeder in order as they come, until ``end``. What is held here has not been sent
    to the worker yet, so it counts against the session's queued speech."""

    def __init__(self) -> None:
        self._pieces: deque[Pcm] = deque()
        self.pending = 0  # samples held, not yet read
        self.received = 0  # samples in all
        self.ended = False
        self._arrived = asyncio.Event()

    def push(self, pcm: Pcm) -> None:
        if pcm.size and not self.ended:
            self._pieces.append(pcm)
            self.pending += pcm.size
            self.received += pcm.size
            self._arrived.set()

    def end(self) -> None:
        self.ended = True
        self._arrived.set()

    async def pieces(self) -> AsyncIterator[Pcm]:
        """What has arrived, as it arrives (several pieces waiting go as one), until the end."""
        while True:
            if self._pieces:
                out = np.concatenate(self._pieces) if len(self._pieces) > 1 else self._pieces[0]
                self._pieces.clear()
                self.pending = 0
                yield out
                continue
            if self.ended:
                return
            self._arrived.clear()
            await self._arrived.wait()


class UtteranceState(Enum):
    QUEUED = "queued"
    SPEAKING = "speaking"


@dataclass
class Utterance:
    id: str
    generation: int
    text: str | None = None
    pcm: Pcm | None = None  # uploaded audio; text is synthesised when its turn comes
    stream: StreamedPcm | None = None  # streamed audio (/audio_stream), sent on as it arrives
    voice: str | None = None  # the TTS voice for this utterance; None: the backend's own
    reply: str | None = None  # the chat reply it is a sentence of
    samples_sent: int = 0
    state: UtteranceState = UtteranceState.QUEUED
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        """Its length: exact for audio, estimated for text not yet synthesised; for a
        stream, what has arrived and is not sent on yet."""
        if self.stream is not None:
            return self.stream.pending / SAMPLE_RATE
        if self.pcm is not None:
            return self.pcm.size / SAMPLE_RATE
        return len(self.text or "") * TEXT_SECONDS_PER_CHAR


class SpeechFeeder:
    def __init__(
        self,
        session_id: str,
        tts: TTSBackend,
        send: Callable[[ToWorker], None],
        cursor: Callable[[], int],
        events: SessionEvents,
        shown: Callable[[], int] = lambda: 0,
        limits: SpeechLimits = DEFAULT_LIMITS,
    ) -> None:
        self.session_id = session_id
        self._tts = tts
        self._send = send
        self._cursor = cursor  # the player's position on the idle loop
        self._shown = shown  # speech samples the player has shown since the last cut
        self._limits = limits
        self._events = events
        self._sent = 0  # speech samples sent to the worker since the last cut
        self._generation = 0
        self._counter = 0
        self._streams = 0  # streamed segments so far: their ids are "<session>-a<n>"
        self._utterances: dict[str, Utterance] = {}
        self._queue: asyncio.Queue[Utterance] = asyncio.Queue()
        self._closed = False
        self._task: asyncio.Task[None] | None = asyncio.ensure_future(self._run())

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def queued(self) -> int:
        """Utterances queued or speaking."""
        return len(self._utterances)

    @property
    def is_speaking(self) -> bool:
        """True from the moment speech is queued until its last frame is shown."""
        return bool(self._utterances)

    # ---- in ----
    def say(self, text: str, voice: str | None = None, reply: str | None = None) -> str:
        return self._enqueue(Utterance("", self._generation, text=text, voice=voice, reply=reply))

    def play(self, pcm: Pcm) -> str:
        return self._enqueue(Utterance("", self._generation, pcm=pcm))

    def stream(self) -> tuple[str, StreamedPcm]:
        """A streamed segment, queued like any utterance (``"<session>-a<n>"``); its audio is
        pushed with ``push_stream`` as it arrives and it ends with ``StreamedPcm.end``."""
        self._streams += 1
        source = StreamedPcm()
        utt = Utterance(f"{self.session_id}-a{self._streams}", self._generation, stream=source)
        return self._enqueue(utt), source

    def push_stream(self, source: StreamedPcm, pcm: Pcm) -> None:
        """More audio of a streamed segment; refused (TooManyRequests) past the session's
        limit of queued speech."""
        queued = self._queued_seconds()
        if queued + pcm.size / SAMPLE_RATE > self._limits.seconds:
            raise TooManyRequests(
                f"this session would have {queued + pcm.size / SAMPLE_RATE:.0f} s of speech queued (at most "
                f"{self._limits.seconds:.0f} s): this piece was dropped; send no faster than the avatar speaks "
                "once that much is queued, or clear_buffer"
            )
        source.push(pcm)

    def _queued_seconds(self) -> float:
        """Speech held here, not yet sent to the worker: what the limit bounds."""
        return sum(u.seconds for u in self._utterances.values() if u.samples_sent == 0 or u.stream is not None)

    def _enqueue(self, utt: Utterance) -> str:
        if len(self._utterances) >= self._limits.utterances:
            raise TooManyRequests(
                f"this session already has {len(self._utterances)} utterances queued (at most {self._limits.utterances}): "
                "wait for them to be spoken, or interrupt"
            )
        queued = self._queued_seconds()
        if queued + utt.seconds > self._limits.seconds:
            raise TooManyRequests(
                f"this session would have {queued + utt.seconds:.0f} s of speech queued (at most {self._limits.seconds:.0f} s): "
                "wait for it to be spoken, or interrupt"
            )
        self._counter += 1
        utt.id = utt.id or f"{self.session_id}-{self._counter}"
        self._utterances[utt.id] = utt
        self._queue.put_nowait(utt)
        source: Literal["text", "audio", "stream"] = "text" if utt.text is not None else "stream" if utt.stream is not None else "audio"
        self._events.publish(Queued(utt.id, utt.text, source, utt.reply))
        return utt.id

    # ---- stopping ----
    def interrupt(self) -> list[str]:
        """Drop all speech, queued or in progress, here and in the worker; returns the
        utterances that were cut."""
        cut = self._reset()
        self._send(Interrupt(self.session_id))
        for utt in cut:
            self._events.publish(_ended(utt, interrupted=True))
        return [utt.id for utt in cut]

    def worker_lost(self) -> list[str]:
        """The worker died with our speech in it: a new one knows nothing to drop."""
        cut = self._reset()
        for utt in cut:
            self._events.publish(
                ErrorEvent(int(ErrorCode.WORKER_UNAVAILABLE), "the inference worker restarted; speech was cut off", utt.id, utt.reply)
            )
            self._events.publish(_ended(utt, interrupted=True))
        return [utt.id for utt in cut]

    def _reset(self) -> list[Utterance]:
        self._generation += 1
        self._sent = 0  # the player's count restarts with its cut too
        if self._task is not None:
            self._task.cancel()
        self._queue = asyncio.Queue()
        cut = list(self._utterances.values())
        self._utterances.clear()
        if not self._closed:
            self._task = asyncio.ensure_future(self._run())
        return cut

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for utt in list(self._utterances.values()):
            self._end(utt, interrupted=True)

    # ---- from the player ----
    def started(self, utterance_id: str) -> None:
        utt = self._utterances.get(utterance_id)
        if utt is not None and utt.state is UtteranceState.QUEUED:
            utt.state = UtteranceState.SPEAKING
            latency_ms = round((time.monotonic() - utt.queued_at) * 1000, 1)
            self._events.publish(SpeakingStarted(utterance_id, latency_ms, utt.text, utt.reply))

    def ended(self, utterance_id: str) -> None:
        utt = self._utterances.get(utterance_id)
        if utt is not None:
            self._end(utt)

    def _end(self, utt: Utterance, **flags: bool) -> None:
        if self._utterances.pop(utt.id, None) is not None:
            self._events.publish(_ended(utt, **flags))

    # ---- out ----
    async def _pcm(self, utt: Utterance) -> AsyncIterator[Pcm]:
        if utt.text is not None:
            async for chunk in self._tts.stream(utt.text, utt.voice):
                yield chunk
        elif utt.stream is not None:
            async for piece in utt.stream.pieces():
                yield piece
        elif utt.pcm is not None:
            for start in range(0, utt.pcm.size, UPLOAD_CHUNK_SAMPLES):
                yield utt.pcm[start : start + UPLOAD_CHUNK_SAMPLES]

    def _chunk(self, utt: Utterance, pcm: Pcm, final: bool = False, start_cursor: int = 0) -> AudioChunk:
        return AudioChunk(self.session_id, self._generation, utt.id, pcm, SAMPLE_RATE, final, start_cursor)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            utt = await queue.get()
            if utt.generation != self._generation or utt.id not in self._utterances:
                continue
            try:
                async for pcm in self._pcm(utt):
                    if pcm.size == 0:
                        continue
                    # Backpressure: the worker holds what it is sent until it is shown, so
                    # the feeder (and a TTS stream behind it) waits while plenty is ahead.
                    # polled: the player would otherwise need a callback per frame for this
                    while self._sent - self._shown() > AHEAD_S * SAMPLE_RATE:  # noqa: ASYNC110
                        await asyncio.sleep(AHEAD_POLL_S)
                    lead = START_LEAD_FRAMES + (STREAM_LEAD_FRAMES if utt.stream is not None else 0)
                    start = self._cursor() + lead if utt.samples_sent == 0 else 0
                    self._send(self._chunk(utt, pcm, start_cursor=start))
                    utt.samples_sent += pcm.size
                    self._sent += pcm.size
                if utt.samples_sent == 0:
                    self._end(utt, empty=True)
                    continue
                self._send(self._chunk(utt, silence(0), final=True))
            except TTSError as exc:
                log.warning("session %s: TTS failed: %s", self.session_id, exc)
                self._events.publish(ErrorEvent(int(ErrorCode.TTS_FAILED), str(exc), utt.id, utt.reply))
                if utt.samples_sent:
                    self._send(self._chunk(utt, silence(0), final=True))
                else:
                    self._end(utt, error=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("session %s: speech failed", self.session_id)
                self._events.publish(ErrorEvent(int(ErrorCode.INTERNAL), f"speech failed: {exc}", utt.id, utt.reply))
                self._end(utt, error=True)



def _ended(utt: Utterance, **flags: bool) -> SpeakingEnded:
    return SpeakingEnded(utt.id, text=utt.text, reply=utt.reply, **flags)
