"""The session player: decides each 40 ms media frame of a session, once.

Frame ``n`` is the worker's next speaking frame if one is ready, otherwise the frame of
the action clip being played (with its sound), otherwise the avatar's idle frame.
Whichever track asks first decides it; both then read the same frame, and every frame sink
(a recorder, say) sees it once, in order. The player alone owns the cursor on the avatar's
idle loop and the clip on air; the generation it checks frames against belongs to the
speech feeder, and the worker echoes it on every frame.

Clips:

* a looping clip plays until something else is chosen; a one-shot clip plays once, then
  the idle loop;
* speech leaves a clip: the worker renders speech on the avatar's own frames, so the
  clip is over (a "thinking" clip ends when the answer starts); after the speech comes the
  idle loop, not the clip again. A clip chosen while speaking starts when the speech stops;
* every switch between pictures that do not follow on (idle or speech to a clip and back,
  clip to clip) cross-fades over ``FADE_FRAMES``. Speech and the idle loop follow on
  (speech is rendered at the idle cursor), so those switches cost nothing; a restart
  (``reinit``) shows the first frame at once, as LiveTalking's does.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import cv2
import numpy as np

from avatars.avatar import Avatar
from avatars.clips import Clip
from media.pcm import SILENT_FRAME, Pcm
from media.timing import FRAME_S
from pipeline.frame_ring import FrameRing
from pipeline.messages import FrameReady
from server.frames import I420, Image, MediaFrame, to_i420

log = logging.getLogger(__name__)

KEEP_FRAMES = 50  # decided frames kept for the slower track
FADE_FRAMES = 5  # a switch blends the old picture into the new over this many frames (200 ms)
# A streamed utterance (``hold_start``) starts, and after running dry resumes, only once
# this many of its frames are rendered (or its last one is): 40-80 ms of margin against audio
# that arrives at real time with jitter, instead of a stutter of single frames.
STREAM_START_FRAMES = 2
# I420 of idle frames kept per avatar, shared by its sessions: all of a short avatar; of
# 30 s of 1080p (3.1 GB as I420) the first frames, the rest converted as they play (~2 ms)
IDLE_YUV_BYTES = 256 * 2**20
CLIP_YUV_BYTES = 128 * 2**20  # I420 kept per clip; the rest of a long HD clip is converted as it plays

Scene = tuple[str, int]  # what a frame shows: ("idle", 0), ("speech", 0) or ("clip", play)
IDLE: Scene = ("idle", 0)
SPEECH: Scene = ("speech", 0)

FrameSink = Callable[[MediaFrame], None]
IdleCache = dict[int, I420 | None]  # I420 of idle frames by avatar index, shared per avatar


@dataclass
class ClipPlay:
    """A clip chosen to play: which, the play's serial (another clip is another play), and
    the frames of it shown so far."""

    clip: Clip
    serial: int
    shown: int = 0


def follows_on(a: Scene, b: Scene) -> bool:
    """Whether ``b``'s picture continues ``a``'s with no jump, so needs no cross-fade."""
    return a == b or {a[0], b[0]} == {"idle", "speech"}


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
        self._clip: ClipPlay | None = None
        self._plays = 0
        self._scene: Scene = IDLE
        self._last_image: Image | None = None
        self._fade_from: Image | None = None  # the picture a cross-fade starts from
        self._fade_step = 0
        self._held: set[str] = set()  # streamed utterances that play from a start buffer
        self._flowing: str | None = None  # the held utterance playing now, not run dry since it started

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

    # ---- action clips ----
    @property
    def clip(self) -> Clip | None:
        """The clip on air, or chosen to start when the speech stops; None for the idle loop."""
        return self._clip.clip if self._clip is not None else None

    def play_clip(self, clip: Clip, restart: bool = False) -> None:
        """Play ``clip`` from its first frame; the clip already playing goes on unless
        ``restart``."""
        current = self._clip
        if current is not None and current.clip.name == clip.name:
            if restart:
                current.clip, current.shown = clip, 0  # (the newest version, when it was added again)
            return
        self._plays += 1
        self._clip = ClipPlay(clip, self._plays)

    def play_idle(self, restart: bool = False) -> None:
        """Leave any clip for the idle loop (from its start with ``restart``)."""
        self._clip = None
        if restart:
            self.restart_idle()

    def restart(self) -> None:
        """Restart what plays while silent: the clip, or else the idle loop."""
        if self._clip is not None:
            self.play_clip(self._clip.clip, restart=True)
        else:
            self.restart_idle()

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

    def hold_start(self, utterance_id: str) -> None:
        """Play ``utterance_id`` (audio still arriving) from a start buffer: its first frame
        waits until ``STREAM_START_FRAMES`` are rendered, and so does the next one after
        it runs dry; meanwhile idle frames, silent, inside the utterance."""
        self._held.add(utterance_id)

    def _may_play(self) -> bool:
        """The next rendered frame may go out now (a held utterance's start buffer is full)."""
        head = self._pending[0].utterance_id
        if head not in self._held or head == self._flowing:
            return True
        buffered = [m for m in self._pending if m.utterance_id == head]
        if len(buffered) >= STREAM_START_FRAMES or buffered[-1].last:
            self._flowing = head
            return True
        return False

    def cut(self) -> None:
        """Drop every speaking frame not yet shown, and silence the frame on air (it may
        still have 20 ms of speech to send). The speech feeder reports the cut utterances."""
        while self._pending:
            self._release(self._pending.popleft().slot)
        self.speech_shown = 0
        self._held.clear()
        self._flowing = None
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
        if not self._pending:
            self._flowing = None  # ran dry: a held utterance buffers again before it resumes
        if self._pending and not self.closed and self._may_play():
            msg = self._pending.popleft()
            image = self.ring.view(msg.slot).copy()
            self.ring.release(msg.slot)
            if self._clip is not None and self._clip.shown:
                self._clip = None  # speech leaves the clip on air; one chosen while speaking waits
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
                self._held.discard(msg.utterance_id)
                self._flowing = None
                self._notify_ended(msg.utterance_id)
            return self._shown(n, image, msg.audio, msg.utterance_id, SPEECH, None)
        if self._clip is not None and (self._clip.shown or self._speaking is None):
            return self._clip_frame(n, self._clip)  # (one chosen while speaking waits out a stall)
        index = self.avatar.idle_index(self._cursor)
        image = self.avatar.frames[index]
        yuv = self._idle_yuv.get(index)
        if yuv is None:
            yuv = to_i420(image)
            if (len(self._idle_yuv) + 1) * (image.size // 2) <= IDLE_YUV_BYTES:
                self._idle_yuv[index] = yuv
        self._cursor += 1
        return self._shown(n, image, SILENT_FRAME, None, IDLE, yuv)

    def _clip_frame(self, n: int, play: ClipPlay) -> MediaFrame:
        clip = play.clip
        k = play.shown % clip.num_frames
        image = clip.frames[k]
        yuv = clip.yuv[k] if k in clip.yuv else to_i420(image)
        if k not in clip.yuv and (len(clip.yuv) + 1) * (image.size // 2) <= CLIP_YUV_BYTES:
            clip.yuv[k] = yuv  # converted once for every session that plays the clip
        audio = clip.audio_at(k)
        play.shown += 1
        if not clip.loop and play.shown >= clip.num_frames:
            self._clip = None  # played once: the idle loop (where it was left) comes next
        return self._shown(n, image, SILENT_FRAME if audio is None else audio, None, ("clip", play.serial), yuv)

    def _shown(self, n: int, image: Image, audio: Pcm, utterance_id: str | None, scene: Scene, yuv: I420 | None) -> MediaFrame:
        """The frame as it goes out: cross-faded from the last picture when ``scene`` does not
        follow on from it; ``yuv`` None means not converted yet."""
        if not follows_on(self._scene, scene) and self._last_image is not None:
            self._fade_from, self._fade_step = self._last_image, 0
        self._scene = scene
        if self._fade_from is not None:
            self._fade_step += 1
            alpha = self._fade_step / (FADE_FRAMES + 1)
            image = np.asarray(cv2.addWeighted(self._fade_from, 1.0 - alpha, image, alpha, 0.0), np.uint8)
            yuv = to_i420(image)
            if self._fade_step >= FADE_FRAMES:
                self._fade_from = None
        elif yuv is None:
            yuv = to_i420(image)
        self._last_image = image
        return MediaFrame(n, image, audio, utterance_id, yuv)

    def _notify_ended(self, utterance_id: str) -> None:
        if self._listener is not None:
            self._listener.on_playback_ended(utterance_id)

    def close(self) -> None:
        self.closed = True
        self._pending.clear()
        self._sinks.clear()
