"""The clocks of a session, defined once.

Every video frame carries exactly its 40 ms of audio: 640 samples at 16 kHz. The audio
track sends that as two 20 ms Opus frames at 48 kHz; RTP counts video at 90 kHz.
"""
from __future__ import annotations

from fractions import Fraction

SAMPLE_RATE = 16_000  # Hz: the project's PCM (and Whisper's input rate)
FPS = 25  # video frames a second
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: the audio one video frame carries
FRAME_S = 1.0 / FPS  # 0.04 s

AUDIO_FRAME_S = 0.02  # one Opus frame
AUDIO_FRAME_SAMPLES = int(SAMPLE_RATE * AUDIO_FRAME_S)  # 320 at 16 kHz
AUDIO_FRAMES_PER_VIDEO_FRAME = SAMPLES_PER_FRAME // AUDIO_FRAME_SAMPLES  # 2
OPUS_RATE = 48_000  # Hz: what WebRTC's Opus runs at, and its RTP clock
VIDEO_CLOCK = 90_000  # Hz: the RTP clock of video
VIDEO_TICKS_PER_FRAME = VIDEO_CLOCK // FPS  # 3600

VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = Fraction(1, OPUS_RATE)


def frames_for_samples(samples: int) -> int:
    """Video frames that cover ``samples`` of audio: every sample lands in a frame."""
    return -(-samples // SAMPLES_PER_FRAME)

