"""Avatar frames compressed on disk and decoded once per machine (``avatars.frame_store``)."""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avatars.avatar import Avatar, load_avatar, save_avatar
from avatars.frame_store import FRAMES_FILE, FrameStoreError, SharedFrames, stored_bytes


def _frames(n: int = 12, h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth gradients that move from frame to frame, as a face video's are."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (x * 2 + i * 5) % 256
        out[i, ..., 1] = (y * 2 + i * 3) % 256
        out[i, ..., 2] = 128 + 60 * np.sin((x + y + i) / 9)
    return out


def _save(data: Path, name: str = "clip", frames: np.ndarray | None = None) -> Avatar:
    frames = _frames() if frames is None else frames
    lms = np.zeros((len(frames), 478, 2), np.float32)
    return save_avatar(data, name, frames, lms)


def test_frames_come_back_close_to_what_was_saved_and_take_a_fraction_of_the_raw_size(tmp_path: Path) -> None:
    frames = _frames()
    avatar = _save(tmp_path, frames=frames)
    assert isinstance(avatar.frames, SharedFrames)
    assert avatar.frames.shape == frames.shape and len(avatar.frames) == len(frames)
    got = np.asarray(avatar.frames)
    assert np.abs(got.astype(int) - frames).mean() < 2.0
    assert stored_bytes(avatar.path) < frames.nbytes / 4
    assert not (avatar.path / "frames.npy").exists()


def test_reading_a_frame_decodes_only_that_frame_and_slices_work(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    frames = avatar.frames
    assert isinstance(frames, SharedFrames)
    assert frames.decoded() == 0
    crop = frames[3, 10:20, 30:34]
    assert crop.shape == (10, 4, 3) and frames.decoded() == 1
    assert frames[-1].shape == (96, 128, 3) and frames.decoded() == 2
    frames[5:7]
    assert frames.decoded() == 4


def test_frames_are_read_only(tmp_path: Path) -> None:
    frame = _save(tmp_path).frames[0]
    with pytest.raises(ValueError, match="read-only"):
        frame[0, 0, 0] = 1


def _decode_all_in_another_process(data: str, name: str) -> str:
    avatar = load_avatar(Path(data), name)
    assert isinstance(avatar.frames, SharedFrames)
    avatar.frames.decode_all()
    return str(avatar.frames.cache_path)


def test_a_frame_decoded_by_one_process_is_there_for_every_other(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    assert isinstance(avatar.frames, SharedFrames)
    with mp.get_context("spawn").Pool(1) as pool:
        their_cache = pool.apply(_decode_all_in_another_process, (str(tmp_path), "clip"))
    assert their_cache == str(avatar.frames.cache_path)  # one cache per machine
    assert avatar.frames.decoded() == avatar.num_frames  # nothing left for this process to decode


def test_preparing_again_gets_a_fresh_cache_and_the_stale_one_is_removed(tmp_path: Path) -> None:
    first = _save(tmp_path)
    assert isinstance(first.frames, SharedFrames)
    first.frames[0]
    old_cache = first.frames.cache_path
    second = _save(tmp_path, frames=_frames()[::-1].copy())
    assert isinstance(second.frames, SharedFrames)
    assert second.frames.cache_path != old_cache
    assert not old_cache.exists()
    assert np.abs(second.frames[0].astype(int) - _frames()[-1]).mean() < 2.0


def test_a_damaged_frames_file_is_reported_with_what_to_do(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    path = avatar.path / FRAMES_FILE
    raw = bytearray(path.read_bytes())
    raw[: len(raw) // 2] = b"\0" * (len(raw) // 2)
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    broken = load_avatar(tmp_path, "clip")
    with pytest.raises(FrameStoreError, match="prepare the avatar again"):
        broken.frames[0]


def test_release_removes_the_machine_cache(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    assert isinstance(avatar.frames, SharedFrames)
    avatar.frames[0]
    cache = avatar.frames.cache_path
    assert cache.exists()
    avatar.release()
    assert not cache.exists()


def test_legacy_raw_frames_still_load(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    frames = np.asarray(avatar.frames).copy()
    np.save(avatar.path / "frames.npy", frames)
    (avatar.path / FRAMES_FILE).unlink()
    legacy = load_avatar(tmp_path, "clip")
    assert isinstance(legacy.frames, np.ndarray)
    assert np.array_equal(legacy.frames[4], frames[4])


def _hold_cache_until_told(data: str, name: str, ready: Any, done: Any) -> None:
    avatar = load_avatar(Path(data), name)
    avatar.frames[0]
    ready.set()
    done.wait(30)


def test_the_cache_is_removed_by_the_last_process_that_lets_go_of_it(tmp_path: Path) -> None:
    avatar = _save(tmp_path)
    assert isinstance(avatar.frames, SharedFrames)
    cache = avatar.frames.cache_path
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_cache_until_told, args=(str(tmp_path), "clip", ready, done))
    other.start()
    try:
        assert ready.wait(60)
        avatar.release()
        assert cache.exists(), "another process still uses it"
    finally:
        done.set()
        other.join(30)
    assert not cache.exists(), "the last user removed it on exit"
    again = load_avatar(tmp_path, "clip")
    del again
    gc.collect()
    assert not cache.exists(), "an avatar collected lets go too"
