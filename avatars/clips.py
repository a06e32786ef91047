"""An avatar's action clips: short videos a session plays instead of the idle loop (a
wave, a nod, "thinking"), chosen with ``POST /set_audiotype`` by number or name.

On disk, under the avatar's folder: ``clips/<name>/`` holds ``clip.json``, the frames
stored as the avatar's are (``frames.jpg`` + ``frames.idx.npy``, decoded on first use into
the machine's shared cache, ``avatars.frame_store``) and, when the source had sound,
``audio.wav``: 16 kHz mono s16, exactly 640 samples (one 40 ms frame's worth) per frame.
``avatar.json`` lists them: ``clips: [{name, number, frames, seconds, has_audio, loop}]``.

Numbers follow LiveTalking (github.com/lipku/LiveTalking), whose clients send them:
``avatars/base_avatar.py`` there has ``custom_audiotype = 0  # 0: normal, 1: silence,
>1: custom audio``; ``data/custom_config.json`` numbers its action clips 2, 3, 4 (1 is the
optional silent idle video) and its page (``web/index.html``) sends ``audiotype: 2`` by
default. So here 0 and 1 both mean the idle loop, and clips are numbered from 2.

A clip is made to fit the avatar: resampled to its frame rate (the nearest source frame
per output tick, as ``avatars.prepare`` does) and scaled to cover its frame size, then
centre-cropped. A source whose aspect ratio differs by more than 5%, or that would have to
be enlarged more than 1.5x, is refused: it was not cut from the avatar's framing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import numpy.typing as npt

from media.pcm import Pcm
from media.timing import SAMPLE_RATE

from .frame_store import FrameStoreError, SharedFrames, write_frames

if TYPE_CHECKING:
    from .avatar import Avatar

log = logging.getLogger(__name__)

CLIP_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")  # a letter first: never read as a number
CLIPS_FOLDER = "clips"
CLIP_INFO = "clip.json"
AUDIO_FILE = "audio.wav"
IDLE_NUMBERS = (0, 1)  # LiveTalking's "normal" and "silence": the idle loop
FIRST_NUMBER = 2  # LiveTalking's first action clip
MAX_NUMBER = 999_999_999  # what ``server.request.CLIP_NUMBER_RE`` reads
MAX_CLIP_SECONDS = 30.0
MAX_ASPECT_CHANGE = 0.05
MAX_UPSCALE = 1.5

Image = npt.NDArray[np.uint8]


class ClipError(ValueError):
    """The clip cannot be made (a bad name or number, a source that does not fit)."""


class ClipExists(ClipError):
    """The name or number is taken, and replacing was not asked for."""


@dataclass
class Clip:
    name: str
    number: int
    path: Path
    frames: SharedFrames  # (N, H, W, 3) uint8 RGB, the avatar's size
    loop: bool = False  # plays until switched away; else once, then the idle loop
    has_audio: bool = False
    fps: int = 25
    # The server's I420 of each frame, made once for every session that plays the clip
    # (the player fills it; a replaced clip is a new object with a fresh one).
    yuv: dict[int, npt.NDArray[np.uint8] | None] = field(default_factory=dict, repr=False, compare=False)
    _audio: Pcm | None = field(default=None, repr=False, compare=False)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def seconds(self) -> float:
        return round(self.num_frames / self.fps, 3)

    def info(self) -> dict[str, Any]:
        """Its entry in ``avatar.json`` (and in API answers)."""
        return {"name": self.name, "number": self.number, "frames": self.num_frames, "seconds": self.seconds,
                "has_audio": self.has_audio, "loop": self.loop}

    def describe(self) -> str:
        return f"{self.number} {self.name!r} ({'loops' if self.loop else 'once'}{', with sound' if self.has_audio else ''})"

    def audio_at(self, index: int) -> Pcm | None:
        """The 40 ms of sound frame ``index`` carries (None for a silent clip). Read from
        disk on first use: the worker loads avatars too, and never plays clips."""
        if not self.has_audio:
            return None
        if self._audio is None:
            self._audio = _read_wav(self.path / AUDIO_FILE, self.num_frames * _samples_per_frame(self.fps))
        per = _samples_per_frame(self.fps)
        return self._audio[index * per : (index + 1) * per]

    def drop_cache(self) -> None:
        self.frames.drop_cache()


def _samples_per_frame(fps: int) -> int:
    return SAMPLE_RATE // fps


def check_clip_name(name: object) -> str:
    if not isinstance(name, str) or not CLIP_NAME_RE.fullmatch(name):
        raise ClipError(
            f"invalid clip name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "(a name that starts with a digit would read as a clip number)"
        )
    return name


def check_number(number: int) -> int:
    if number in IDLE_NUMBERS:
        raise ClipError(
            f"clip number {number} is the idle loop (LiveTalking's 0 'normal' and 1 'silence'); "
            f"number action clips from {FIRST_NUMBER}"
        )
    if not FIRST_NUMBER <= number <= MAX_NUMBER:
        raise ClipError(f"clip number {number} is out of range: use {FIRST_NUMBER}..{MAX_NUMBER}")
    return number


def find_clip(clips: Sequence[Clip], key: int | str) -> Clip | None:
    """The clip numbered or named ``key``."""
    for clip in clips:
        if (clip.number == key) if isinstance(key, int) else (clip.name == key):
            return clip
    return None


def describe_clips(clips: Sequence[Clip]) -> str:
    """For messages: "2 'wave' (once, with sound), 3 'nod' (loops)", or "none"."""
    return ", ".join(c.describe() for c in clips) or "none"


# ---- loading ----
def load_clips(avatar_folder: Path, info: dict[str, Any], data_dir: Path) -> list[Clip]:
    """The clips ``avatar.json`` (``info``) lists, by number. One that is missing or does not
    match the avatar's size is left out with a warning: the avatar itself still loads."""
    avatar_name = str(info.get("name", avatar_folder.name))
    height, width = int(info["height"]), int(info["width"])
    fps = int(info.get("fps", 25))
    out: list[Clip] = []
    for entry in info.get("clips") or []:
        if not isinstance(entry, dict):
            continue  # an older avatar.json listed bare names, before clips could be stored
        name = str(entry.get("name"))
        folder = avatar_folder / CLIPS_FOLDER / name
        try:
            check_clip_name(name)
            meta = json.loads((folder / CLIP_INFO).read_text())
            if (int(meta["height"]), int(meta["width"])) != (height, width):
                raise ClipError(f"its frames are {meta['width']}x{meta['height']}, the avatar's {width}x{height}")
            frames = SharedFrames(folder, f"{avatar_name}+{name}", height, width, data_dir)
            out.append(Clip(name, int(entry["number"]), folder, frames, loop=bool(entry.get("loop", False)),
                            has_audio=bool(entry.get("has_audio", False)) and (folder / AUDIO_FILE).is_file(), fps=fps))
        except (OSError, ValueError, KeyError, TypeError, FrameStoreError) as exc:
            log.warning("avatar %s: clip %r left out: %s; add it again with python -m avatars add-clip", avatar_name, name, exc)
    return sorted(out, key=lambda c: c.number)


def reload_clips(avatar: Avatar, data_dir: Path) -> list[Clip]:
    """Read ``avatar``'s clip list again (after one was added) and give it to the loaded
    avatar, so its open sessions can play the new clip. A clip on air keeps playing."""
    info = json.loads((avatar.path / "avatar.json").read_text())
    avatar.clips = load_clips(avatar.path, info, data_dir)
    return avatar.clips


# ---- adding ----
def add_clip(
    data_dir: Path,
    avatar_name: str,
    clip_name: str,
    source: Path | bytes,
    number: int | None = None,
    loop: bool = False,
    replace: bool = False,
) -> Clip:
    """Make clip ``clip_name`` of avatar ``avatar_name`` from a video (a path, or the file's
    bytes), keeping its sound if it has any, and list it in ``avatar.json``. ``number``
    defaults to the clip's current one when replacing, else the first free from 2."""
    from .avatar import load_avatar, update_avatar  # avatar.py imports this module

    check_clip_name(clip_name)
    if number is not None:
        check_number(number)
    avatar = load_avatar(data_dir, avatar_name)
    _check_free(avatar.meta, clip_name, number, replace)  # before the work; again under the lock
    root = avatar.path / CLIPS_FOLDER
    root.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{clip_name}.", suffix=".tmp", dir=root))
    try:
        tmp.chmod(0o755)
        with _open(source) as container:
            has_audio = bool(container.streams.audio)
            try:
                count, _h, _w = write_frames(tmp, _fitted_frames(container, avatar.width, avatar.height, avatar.fps))
            except FrameStoreError as exc:  # no frames at all
                raise ClipError(f"the video holds no usable frames ({exc})") from None
        sound = _clip_audio(source, count * _samples_per_frame(avatar.fps)) if has_audio else None
        has_audio = sound is not None
        if sound is not None:
            _write_wav(tmp / AUDIO_FILE, sound)
        with _lock(root / ".lock"):
            info = json.loads((avatar.path / "avatar.json").read_text())
            number = _check_free(info, clip_name, number, replace)
            entry = {"name": clip_name, "number": number, "frames": count, "seconds": round(count / avatar.fps, 3),
                     "has_audio": has_audio, "loop": loop}
            (tmp / CLIP_INFO).write_text(json.dumps({**entry, "fps": avatar.fps, "width": avatar.width,
                                                     "height": avatar.height}, indent=2))
            _publish(tmp, root / clip_name)
            listed = [c for c in info.get("clips") or [] if isinstance(c, dict) and c.get("name") != clip_name]
            update_avatar(data_dir, avatar_name, meta={"clips": sorted([*listed, entry], key=lambda c: int(c["number"]))})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("avatar %s: clip %d %r added (%d frames, %s)", avatar_name, number, clip_name, count,
             "with sound" if has_audio else "silent")
    added = find_clip(load_clips(avatar.path, json.loads((avatar.path / "avatar.json").read_text()), data_dir), clip_name)
    if added is None:
        raise ClipError(f"clip {clip_name!r} was written but does not load; see the log")
    return added


def _check_free(info: dict[str, Any], name: str, number: int | None, replace: bool) -> int:
    """The number the clip gets; ``ClipExists`` when the name (without ``replace``) or the
    number (held by another clip) is taken."""
    listed = [c for c in info.get("clips") or [] if isinstance(c, dict)]
    mine = next((c for c in listed if c.get("name") == name), None)
    if mine is not None and not replace:
        raise ClipExists(f"the avatar already has a clip named {name!r} (number {mine.get('number')}): "
                         "send replace to make it again")
    taken = {int(c["number"]): str(c.get("name")) for c in listed if c is not mine and isinstance(c.get("number"), int)}
    if number is None:
        if mine is not None and isinstance(mine.get("number"), int):
            return int(mine["number"])
        number = FIRST_NUMBER
        while number in taken:
            number += 1
        return number
    if number in taken:
        raise ClipExists(f"clip number {number} is taken by clip {taken[number]!r}: choose another number")
    return number


@contextlib.contextmanager
def _open(source: Path | bytes) -> Iterator[Any]:
    import av

    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ClipError(f"not a readable video: {exc}") from None
    with container:
        yield container


def _fitted_frames(container: Any, width: int, height: int, fps: int) -> Iterator[Image]:
    """The video's frames at ``fps``, each scaled to cover ``width`` x ``height`` and
    centre-cropped to it; a ``ClipError`` when it does not fit or is too long."""
    import av

    from .prepare import _apply_rotation, _pick_frames  # one frame-rate rule for avatars and clips

    if not container.streams.video:
        raise ClipError("the file has no video stream: a clip needs pictures (and may have sound)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    duration = _duration_s(container, stream)
    if duration is not None and duration > MAX_CLIP_SECONDS + 0.5:
        raise ClipError(f"the video is {duration:.1f} s long; a clip is at most {MAX_CLIP_SECONDS:.0f} s: cut it shorter")
    rate = float(stream.average_rate or stream.guessed_rate or fps)
    limit = math.floor(MAX_CLIP_SECONDS * fps) + 1
    n = 0
    try:
        for frame in _pick_frames(container.decode(stream), rate, fps, limit):
            if n == limit - 1:
                raise ClipError(f"the video is longer than {MAX_CLIP_SECONDS:.0f} s, the most a clip may be: cut it shorter")
            rgb = _apply_rotation(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0) or 0)
            yield fit_frame(rgb, width, height)
            n += 1
    except av.error.FFmpegError as exc:
        if n == 0:
            raise ClipError(f"the video cannot be decoded: {exc}") from None
        log.warning("clip: decoding stopped after %d frames: %s", n, exc)


def fit_frame(rgb: Image, width: int, height: int) -> Image:
    """``rgb`` scaled to cover ``width`` x ``height`` and centre-cropped to it; a
    ``ClipError`` when its aspect ratio or size is too far from that."""
    h, w = rgb.shape[:2]
    aspect_change = (w / h) / (width / height) - 1.0
    if abs(aspect_change) > MAX_ASPECT_CHANGE:
        raise ClipError(
            f"the clip is {w}x{h} and the avatar {width}x{height}: their shapes differ by {abs(aspect_change):.0%} "
            f"(at most {MAX_ASPECT_CHANGE:.0%}); cut the clip from the avatar's own framing"
        )
    scale = max(width / w, height / h)
    if scale > MAX_UPSCALE:
        raise ClipError(
            f"the clip is {w}x{h}, too small for the avatar's {width}x{height} (it would be enlarged {scale:.1f}x, "
            f"at most {MAX_UPSCALE}x): use a sharper source"
        )
    if (w, h) == (width, height):
        return np.ascontiguousarray(rgb)
    tw, th = max(width, math.ceil(w * scale)), max(height, math.ceil(h * scale))
    resized = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    x0, y0 = (tw - width) // 2, (th - height) // 2
    return np.ascontiguousarray(resized[y0 : y0 + height, x0 : x0 + width])


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE units
    return None


def _clip_audio(source: Path | bytes, samples: int) -> Pcm | None:
    """The source's sound at 16 kHz mono, cut or padded with silence to ``samples``; None
    when its audio track holds nothing readable (the clip is then silent, and its
    ``has_audio`` says so)."""
    from media.decode import AudioDecodeError, decode_audio

    try:
        pcm = decode_audio(source, max_seconds=MAX_CLIP_SECONDS + 5)
    except AudioDecodeError as exc:
        log.warning("clip: the video's sound cannot be read (%s); the clip will be silent", exc)
        return None
    out = np.zeros(samples, np.int16)
    out[: min(samples, pcm.size)] = pcm[:samples]
    return out


def _write_wav(path: Path, pcm: Pcm) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(pcm, "<i2").tobytes())


def _read_wav(path: Path, samples: int) -> Pcm:
    """What ``_write_wav`` wrote, cut or padded to ``samples``, read-only (sessions share it)."""
    with wave.open(str(path), "rb") as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, SAMPLE_RATE):
            raise ClipError(f"{path} is not 16 kHz mono 16-bit: add the clip again")
        raw = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.int16)
    out = np.zeros(samples, np.int16)
    out[: min(samples, raw.size)] = raw[:samples]
    out.setflags(write=False)
    return out


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` into place (the caller holds the clips lock). A previous version is
    moved aside first and removed; a session playing it keeps its mapped pages."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        final.rename(old)
    try:
        tmp.rename(final)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX): two processes adding clips to one avatar do not
    lose each other's entry in avatar.json."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one writer at a time is the user's care
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
