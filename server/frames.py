"""A media frame as the session decides it: one picture and exactly its 40 ms of audio,
and the conversions the video encoder wants."""
from __future__ import annotations

from dataclasses import dataclass

import av
import cv2
import numpy as np
import numpy.typing as npt

from media.pcm import Pcm

Image = npt.NDArray[np.uint8]  # (H, W, 3) RGB
I420 = npt.NDArray[np.uint8]  # (H * 3 / 2, W) planar Y, U, V


@dataclass(frozen=True)
class MediaFrame:
    index: int
    image: Image  # idle frames are views of the avatar's memory map: never write into them
    audio: Pcm  # SAMPLES_PER_FRAME samples
    utterance_id: str | None  # None while idle
    yuv: I420 | None = None  # what the video encoder takes; None for odd sizes


def to_i420(image: Image) -> I420 | None:
    """RGB to I420 (BT.601 video range, as swscale makes it) with OpenCV: ~8x faster than
    letting the encoder convert each frame. None for odd sizes, which I420 cannot hold."""
    if image.shape[0] % 2 or image.shape[1] % 2:
        return None
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2YUV_I420), np.uint8)


def to_video_frame(frame: MediaFrame) -> av.VideoFrame:
    if frame.yuv is not None:
        return av.VideoFrame.from_ndarray(frame.yuv, format="yuv420p")
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.image), format="rgb24")
