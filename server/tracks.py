"""The two aiortc tracks of a session, reading its player on one clock.

Both wait for the same deadlines (t0 + n x 40 ms) and number their frames from the same
origin, so audio and video cannot drift apart and a receiver can line them up by RTP
timestamp. Each 40 ms media frame goes out as one video frame and two 20 ms audio frames.

Every track of a session reads the same player, so a viewer's tracks (``join``) get the
very frames the session's own peer gets, decided once; they start at the frame being
shown when they first ask, rather than replay the session from its start.
"""
from __future__ import annotations

import av
import numpy as np
import numpy.typing as npt
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from media.pcm import Pcm, saturate
from media.timing import (
    AUDIO_FRAME_S,
    AUDIO_FRAME_SAMPLES,
    AUDIO_FRAMES_PER_VIDEO_FRAME,
    AUDIO_TIME_BASE,
    FRAME_S,
    OPUS_RATE,
    SAMPLE_RATE,
    VIDEO_TICKS_PER_FRAME,
    VIDEO_TIME_BASE,
)
from server.frames import to_video_frame
from server.player import SessionPlayer

MAX_LATE_S = 0.08  # a video track this late skips ahead rather than fall further behind
UPSAMPLE = OPUS_RATE // SAMPLE_RATE


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, player: SessionPlayer, join: bool = False) -> None:
        super().__init__()
        self.player = player
        self._n: int | None = None if join else 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live" or self.player.closed:
            raise MediaStreamError
        if self._n is None:
            self._n = self.player.current_index()
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
        frame.pts = n * VIDEO_TICKS_PER_FRAME
        frame.time_base = VIDEO_TIME_BASE
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

    def __call__(self, pcm: Pcm) -> npt.NDArray[np.int16]:
        stuffed = np.zeros(pcm.size * self.factor, np.float32)
        stuffed[:: self.factor] = pcm
        padded = np.concatenate([self._history, stuffed])
        self._history = padded[-(self.taps.size - 1) :]
        out = np.convolve(padded, self.taps, mode="valid")
        return saturate(out)


class AvatarAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, player: SessionPlayer, join: bool = False) -> None:
        super().__init__()
        self.player = player
        self._m: int | None = None if join else 0
        self._upsample = Upsampler()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live" or self.player.closed:
            raise MediaStreamError
        if self._m is None:
            self._m = self.player.current_index() * AUDIO_FRAMES_PER_VIDEO_FRAME
        m = self._m
        self._m += 1
        await self.player.wait_until(m * AUDIO_FRAME_S)
        half = m % AUDIO_FRAMES_PER_VIDEO_FRAME
        pcm = self.player.frame(m // AUDIO_FRAMES_PER_VIDEO_FRAME).audio[half * AUDIO_FRAME_SAMPLES : (half + 1) * AUDIO_FRAME_SAMPLES]
        out = self._upsample(pcm)
        frame = av.AudioFrame.from_ndarray(out.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OPUS_RATE
        frame.pts = m * out.size
        frame.time_base = AUDIO_TIME_BASE
        return frame
