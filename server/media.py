"""Per-session media: one clock, one frame sequence, two aiortc tracks reading it.

Frame ``n`` of a session (40 ms) is decided once, by whichever track asks first: the
next speaking frame from the worker if one is ready, otherwise the avatar's idle frame.
Its picture goes to the video track and its exact 40 ms of audio, in two 20 ms halves,
to the audio track. Both tracks wait for the same deadlines (t0 + n x 40 ms), so audio
and video cannot drift apart, and both number their frames from the same origin so a
receiver can line them up by timestamp.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import av
import cv2
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatars.avatar import Avatar
from pipeline.frame_ring import FrameRing
from pipeline.messages import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, FrameReady

log = logging.getLogger(__name__)

FRAME_S = 1.0 / FPS
AUDIO_FRAME_S = 0.02
AUDIO_SAMPLES = int(SAMPLE_RATE * AUDIO_FRAME_S)  # 320 at 16 kHz
OPUS_RATE = 48_000
UPSAMPLE = OPUS_RATE // SAMPLE_RATE
VIDEO_CLOCK = 90_000
MAX_LATE_S = 0.08  # a video track this late skips ahead rather than fall further behind
KEEP_FRAMES = 50  # decided frames kept for the slower track
SILENCE = np.zeros(SAMPLES_PER_FRAME, np.int16)


@dataclass(frozen=True)
class MediaFrame:
    index: int
    image: np.ndarray  # (H, W, 3) uint8 RGB; idle frames are views of the avatar's memory map
    audio: np.ndarray  # (640,) int16 at 16 kHz
    utterance_id: str | None  # None while idle
    yuv: np.ndarray | None = None  # I420 planes, what the video encoder takes


def to_i420(image: np.ndarray) -> np.ndarray | None:
    """RGB to I420 (BT.601 video range, as swscale makes it) with OpenCV: ~8x faster than
    letting the encoder convert each frame. None for odd sizes, which I420 cannot hold."""
    if image.shape[0] % 2 or image.shape[1] % 2:
        return None
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420)


def to_video_frame(frame: MediaFrame) -> av.VideoFrame:
    if frame.yuv is not None:
        return av.VideoFrame.from_ndarray(frame.yuv, format="yuv420p")
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.image), format="rgb24")


class SessionPlayer:
    """Decides each frame of a session and paces both tracks.

    ``on_event(kind, utterance_id)`` is called with ``"started"`` when an utterance's
    first frame is shown and ``"ended"`` after its last; ``on_frame(frame)`` sees every
    decided frame (the recorder hooks in here).
    """

    def __init__(
        self,
        avatar: Avatar,
        ring: FrameRing,
        on_event: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_yuv: dict[int, np.ndarray | None] | None = None,
    ) -> None:
        self.avatar = avatar
        # I420 of idle frames, shared by every session of this avatar: the idle loop
        # repeats, so each frame is converted once.
        self._idle_yuv = idle_yuv if idle_yuv is not None else {}
        self.ring = ring
        self.generation = 0
        self.cursor = 0
        self.on_event = on_event or (lambda kind, utt: None)
        self.on_frame: Callable[[MediaFrame], None] | None = None
        self._clock = clock
        self._t0: float | None = None
        self._pending: deque[FrameReady] = deque()
        self._frames: dict[int, MediaFrame] = {}
        self._decided = -1
        self._speaking: str | None = None
        self.video_frames_skipped = 0
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

    # ---- frames from the worker ----
    def push(self, msg: FrameReady) -> None:
        if self.closed or msg.generation < self.generation:
            self._release(msg.slot)  # rendered before an interrupt: never shown
            return
        self._pending.append(msg)

    def interrupt(self, generation: int) -> list[str]:
        """Drop every frame not yet shown; returns the utterances that were cut off."""
        self.generation = max(self.generation, generation)
        cut = {m.utterance_id for m in self._pending}
        while self._pending:
            self._release(self._pending.popleft().slot)
        if self._speaking is not None:
            cut.add(self._speaking)
            self._speaking = None
            # The frame on air may still have 20 ms of speech to send: silence it too.
            current = self._frames.get(self._decided)
            if current is not None and current.utterance_id is not None:
                self._frames[self._decided] = replace(current, audio=SILENCE)
        return sorted(cut)

    @property
    def last_decided(self) -> int:
        """Index of the newest frame already decided (and so already committed to the tracks)."""
        return self._decided

    def pending_frames(self) -> int:
        return len(self._pending)

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
            if self.on_frame is not None:
                self.on_frame(f)
        found = self._frames.get(n)
        if found is None:  # asked for a frame older than we keep: show the oldest kept
            found = self._frames[min(self._frames)]
        return found

    def _decide(self, n: int) -> MediaFrame:
        if self._pending and not self.closed:
            msg = self._pending.popleft()
            image = self.ring.view(msg.slot).copy()
            self.ring.release(msg.slot)
            self.cursor = msg.cursor + 1
            if msg.utterance_id != self._speaking:
                if self._speaking is not None:
                    self.on_event("ended", self._speaking)
                self._speaking = msg.utterance_id
                self.on_event("started", msg.utterance_id)
            if msg.last:
                self._speaking = None
                self.on_event("ended", msg.utterance_id)
            return MediaFrame(n, image, np.frombuffer(msg.audio, np.int16), msg.utterance_id, to_i420(image))
        index = self.avatar.idle_index(self.cursor)
        image = self.avatar.frames[index]
        if index not in self._idle_yuv:
            self._idle_yuv[index] = to_i420(image)
        self.cursor += 1
        return MediaFrame(n, image, SILENCE, None, self._idle_yuv[index])

    def close(self) -> None:
        self.closed = True
        self._pending.clear()


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, player: SessionPlayer) -> None:
        super().__init__()
        self.player = player
        self._n = 0
        self._time_base = fractions.Fraction(1, VIDEO_CLOCK)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live" or self.player.closed:
            raise MediaStreamError
        n = self._n
        await self.player.wait_until(n * FRAME_S)
        late = self.player.current_index() - n
        if late * FRAME_S > MAX_LATE_S:
            # The encoder fell behind: skip to now instead of piling up latency. The
            # audio track still gets every frame's sound.
            self.player.video_frames_skipped += late
            n += late
        self._n = n + 1
        frame = to_video_frame(self.player.frame(n))
        frame.pts = n * (VIDEO_CLOCK // FPS)
        frame.time_base = self._time_base
        return frame


class Upsampler:
    """16 kHz -> 48 kHz, 20 ms in, exactly 20 ms out, with one millisecond of delay.

    aiortc's Opus encoder would resample too, but it buffers to whole 960-sample frames
    and so sends every frame 20 ms late; this short windowed-sinc interpolator keeps its
    state between frames instead, and leaves aiortc only the mono-to-stereo copy.
    """

    def __init__(self, factor: int = UPSAMPLE, half_width: int = 16, cutoff: float = 0.9) -> None:
        self.factor = factor
        n = np.arange(-half_width * factor, half_width * factor + 1)
        # cutoff below the input's Nyquist frequency, so 7-8 kHz does not fold into images
        taps = np.sinc(cutoff * n / factor) * np.kaiser(n.size, 8.0)
        self.taps = (taps * factor / taps.sum()).astype(np.float32)
        self.delay = half_width * factor  # output samples of delay: 48 at 48 kHz = 1 ms
        self._history = np.zeros(self.taps.size - 1, np.float32)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        stuffed = np.zeros(pcm.size * self.factor, np.float32)
        stuffed[:: self.factor] = pcm
        padded = np.concatenate([self._history, stuffed])
        self._history = padded[-(self.taps.size - 1) :]
        out = np.convolve(padded, self.taps, mode="valid")
        return np.clip(out, -32768, 32767).astype(np.int16)


class AvatarAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, player: SessionPlayer) -> None:
        super().__init__()
        self.player = player
        self._m = 0
        self._time_base = fractions.Fraction(1, OPUS_RATE)
        self._upsample = Upsampler()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live" or self.player.closed:
            raise MediaStreamError
        m = self._m
        self._m += 1
        await self.player.wait_until(m * AUDIO_FRAME_S)
        half = m % 2
        pcm = self.player.frame(m // 2).audio[half * AUDIO_SAMPLES : (half + 1) * AUDIO_SAMPLES]
        out = self._upsample(pcm.astype(np.float32))
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE
        frame.pts = m * out.size
        frame.time_base = self._time_base
        return frame
