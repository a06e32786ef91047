"""The session player: decides each 40 ms media frame of a session, once.

Frame ``n`` is the worker's next speaking frame if one is ready, otherwise the avatar's
idle frame. Whichever track asks first decides it; both then read the same frame, and
every frame sink (a recorder, say) sees it once, in order. The player alone owns the
cursor on the avatar's idle loop; the generation it checks frames against belongs to the
speech feeder, and the worker echoes it on every frame.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from avatars.avatar import Avatar
from media.pcm import SILENT_FRAME
from media.timing import FRAME_S
from pipeline.frame_ring import FrameRing
from pipeline.messages import FrameReady
from server.frames import I420, MediaFrame, to_i420

log = logging.getLogger(__name__)

KEEP_FRAMES = 50  # decided frames kept for the slower track

FrameSink = Callable[[MediaFrame], None]
IdleCache = dict[int, I420 | None]  # I420 of idle frames by avatar index, shared per avatar


class PlaybackListener(Protocol):
    """Told when an utterance's first frame is decided and after its last one."""

    def on_playback_started(self, utterance_id: str) -> None: ...

    def on_playback_ended(self, utterance_id: str) -> None: ...


class SessionPlayer:
    def __init__(
        self,
        avatar: Avatar,
        ring: FrameRing,
        generation: Callable[[], int],
        listener: PlaybackListener | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_yuv: IdleCache | None = None,
    ) -> None:
        self.avatar = avatar
        self.ring = ring
        self._generation = generation
        self._listener = listener
        # The idle loop repeats, so each idle frame is converted to I420 once, for every
        # session of this avatar.
        self._idle_yuv: IdleCache = idle_yuv if idle_yuv is not None else {}
        self._cursor = 0
        self._sinks: list[FrameSink] = []
        self._clock = clock
        self._t0: float | None = None
        self._pending: deque[FrameReady] = deque()
        self._frames: dict[int, MediaFrame] = {}
        self._decided = -1
        self._speaking: str | None = None
        self.video_frames_skipped = 0
        self.speech_shown = 0  # speech samples decided since the last cut: the feeder's backpressure
        self.closed = False

    # ---- clock ----
    def start_clock(self) -> float:
        if self._t0 is None:
            self._t0 = self._clock()
        return self._t0

    def due(self, seconds: float) -> float:
        return self.start_clock() + seconds

    async def wait_until(self, seconds: float) -> None:
        delay = self.due(seconds) - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    def current_index(self) -> int:
        """The frame being shown now (by the clock)."""
        if self._t0 is None:
            return 0
        return max(0, int((self._clock() - self._t0) / FRAME_S))

    # ---- the idle loop ----
    @property
    def cursor(self) -> int:
        """Position on the avatar's idle loop of the next frame to decide."""
        return self._cursor

    def restart_idle(self) -> None:
        """Go back to the start of the idle loop (the seed's ``reinit``)."""
        self._cursor = 0

    # ---- frame sinks ----
    def add_sink(self, sink: FrameSink) -> None:
        self._sinks.append(sink)

    def remove_sink(self, sink: FrameSink) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    # ---- frames from the worker ----
    def push(self, msg: FrameReady) -> None:
        if self.closed or msg.generation < self._generation():
            self._release(msg.slot)  # rendered before an interrupt: never shown
            return
        self._pending.append(msg)

    def cut(self) -> None:
        """Drop every speaking frame not yet shown, and silence the frame on air (it may
        still have 20 ms of speech to send). The speech feeder reports the cut utterances."""
        while self._pending:
            self._release(self._pending.popleft().slot)
        self.speech_shown = 0
        if self._speaking is not None:
            self._speaking = None
            current = self._frames.get(self._decided)
            if current is not None and current.utterance_id is not None:
                self._frames[self._decided] = replace(current, audio=SILENT_FRAME)

    @property
    def last_decided(self) -> int:
        """Index of the newest frame already decided (and so already committed to the tracks)."""
        return self._decided

    def _release(self, slot: int) -> None:
        if not self.closed:
            self.ring.release(slot)

    # ---- deciding frames ----
    def frame(self, n: int) -> MediaFrame:
        """Frame ``n``, deciding every frame up to it in order."""
        while self._decided < n:
            self._decided += 1
            f = self._decide(self._decided)
            self._frames[f.index] = f
            self._frames.pop(f.index - KEEP_FRAMES, None)  # the one frame now too old to keep
            for sink in self._sinks:
                sink(f)
        found = self._frames.get(n)
        if found is None:  # asked for a frame older than we keep: show the oldest kept
            found = self._frames[min(self._frames)]
        return found

    def _decide(self, n: int) -> MediaFrame:
        if self._pending and not self.closed:
            msg = self._pending.popleft()
            image = self.ring.view(msg.slot).copy()
            self.ring.release(msg.slot)
            self._cursor = msg.cursor + 1
            self.speech_shown += msg.audio.size
            if msg.utterance_id != self._speaking:
                if self._speaking is not None:
                    self._notify_ended(self._speaking)
                self._speaking = msg.utterance_id
                if self._listener is not None:
                    self._listener.on_playback_started(msg.utterance_id)
            if msg.last:
                self._speaking = None
                self._notify_ended(msg.utterance_id)
            return MediaFrame(n, image, msg.audio, msg.utterance_id, to_i420(image))
        index = self.avatar.idle_index(self._cursor)
        image = self.avatar.frames[index]
        if index not in self._idle_yuv:
            self._idle_yuv[index] = to_i420(image)
        self._cursor += 1
        return MediaFrame(n, image, SILENT_FRAME, None, self._idle_yuv[index])

    def _notify_ended(self, utterance_id: str) -> None:
        if self._listener is not None:
            self._listener.on_playback_ended(utterance_id)

    def close(self) -> None:
        self.closed = True
        self._pending.clear()
        self._sinks.clear()
