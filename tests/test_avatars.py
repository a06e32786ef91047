"""Avatar preparation: the built-in default avatar, videos and pictures, the cache, the CLI."""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatars import default as default_mod
from avatars.__main__ import main as cli_main
from avatars.avatar import Avatar, InvalidAvatarName, check_name, list_avatars, load_avatar, save_avatar
from avatars.default import IdleMotion, close_eyes, default_still, ensure_default_avatar
from avatars.landmarks import (
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    LIPS_OUTER,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    detect_landmarks,
)
from avatars.prepare import _pick_frames, fit_size, prepare_avatar, video_landmarks
from avatars.prepare import still_landmarks as still_landmarks_of


@pytest.fixture(scope="module")
def default_avatar(tmp_path_factory: pytest.TempPathFactory) -> Avatar:
    return ensure_default_avatar(tmp_path_factory.mktemp("default-data"))


@pytest.fixture(scope="module")
def still_landmarks() -> tuple[np.ndarray, np.ndarray]:
    still = default_still()
    return still, detect_landmarks([still], video=False)[0]


def _write_video(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18"}
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _shifted(img: np.ndarray, dx: float) -> np.ndarray:
    m = np.array([[1.0, 0.0, dx], [0.0, 1.0, 0.0]])
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REPLICATE)


def _eye_contrast(frame: np.ndarray, lm: np.ndarray) -> float:
    """Grey-level spread inside both eye openings: high with sclera and iris showing, low
    over an eyelid."""
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    mask = np.zeros(grey.shape, np.uint8)
    for upper, lower in ((LEFT_EYE_UPPER, LEFT_EYE_LOWER), (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER)):
        poly = np.concatenate([lm[lower], lm[upper][::-1]])
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    return float(grey[mask > 0].std())


# --- the default avatar ---------------------------------------------------------------


def test_default_avatar_is_100_frames_of_512_square_with_a_face_in_every_frame(default_avatar: Avatar) -> None:
    assert default_avatar.frames.shape == (100, 512, 512, 3)
    assert default_avatar.frames.dtype == np.uint8
    assert default_avatar.landmarks.shape == (100, 478, 2)
    assert all(default_avatar.has_face(i) for i in range(100))
    assert default_avatar.fps == 25


def test_default_mouth_corners_sit_on_the_astronauts_mouth_in_every_frame(default_avatar: Avatar) -> None:
    left = default_avatar.landmarks[:, MOUTH_LEFT]
    right = default_avatar.landmarks[:, MOUTH_RIGHT]
    assert np.all((left[:, 0] > 195) & (left[:, 0] < 209)), left[:, 0]
    assert np.all((right[:, 0] > 238) & (right[:, 0] < 252)), right[:, 0]
    assert np.all((left[:, 1] > 134) & (left[:, 1] < 146))
    assert np.all((right[:, 1] > 134) & (right[:, 1] < 146))


def test_default_landmarks_match_a_fresh_detection_on_a_moved_frame(default_avatar: Avatar) -> None:
    # The per-frame landmarks are the still's, moved by the frame's own affine: a detector
    # run on the frame must agree (to its own jitter).
    k = 99  # the sway is at its other extreme here, furthest from frame 0
    fresh = detect_landmarks([np.asarray(default_avatar.frames[k])], video=False)[0]
    lips = default_avatar.landmarks[k, LIPS_OUTER]
    assert np.abs(fresh[LIPS_OUTER] - lips).mean() < 1.0


def test_default_frames_move_but_only_slightly(default_avatar: Avatar) -> None:
    frames = default_avatar.frames
    step = np.array([cv2.absdiff(frames[k], frames[k + 1]).mean() for k in range(len(frames) - 1)])
    assert np.all(step > 0), "consecutive frames are identical: the avatar is frozen"
    assert step.max() < 1.5, step.max()
    assert cv2.absdiff(frames[50], frames[0]).mean() > 0.5
    travel = np.abs(default_avatar.landmarks - default_avatar.landmarks[0]).max()
    assert 0.5 < travel < 4.0, travel  # about a pixel of breathing plus a fraction of a degree


def test_default_motion_turns_round_smoothly_at_both_ends_of_the_clip(default_avatar: Avatar) -> None:
    # Played forward then backward: the first and last steps must be the slowest, or the
    # turn shows as a jerk.
    speed = np.linalg.norm(np.diff(default_avatar.landmarks, axis=0), axis=2).mean(axis=1)
    assert speed[0] < 0.25 * speed.max()
    assert speed[-1] < 0.25 * speed.max()


def test_default_avatar_blinks_once_briefly(default_avatar: Avatar) -> None:
    contrast = np.array(
        [_eye_contrast(default_avatar.frames[k], default_avatar.landmarks[k]) for k in range(default_avatar.num_frames)]
    )
    # Open, the sclera and iris give ~54 grey levels of spread; shut, ~36; the motion alone
    # moves it by ~1.
    closed = contrast < 0.8 * np.median(contrast)
    assert closed.any(), "no frame with the eyes shut"
    # 150-250 ms: a few frames at 25 fps, one run, not at either end of the clip.
    runs = np.flatnonzero(closed)
    assert 1 <= len(runs) <= 5 and runs.max() - runs.min() == len(runs) - 1, runs
    assert runs.min() > 5 and runs.max() < default_avatar.num_frames - 5


def test_closing_the_eyes_leaves_the_mouth_alone(still_landmarks: tuple[np.ndarray, np.ndarray]) -> None:
    still, lm = still_landmarks
    shut = close_eyes(still, lm, 1.0)
    x0, y0 = np.floor(lm[LIPS_OUTER].min(axis=0)).astype(int) - 10
    x1, y1 = np.ceil(lm[LIPS_OUTER].max(axis=0)).astype(int) + 10
    assert np.array_equal(shut[y0:y1, x0:x1], still[y0:y1, x0:x1])
    changed = np.argwhere(np.any(shut != still, axis=2))
    assert changed[:, 0].max() < lm[1, 1]  # nothing below the nose tip changes


def test_default_avatar_second_call_loads_the_cache_without_rebuilding(default_avatar: Avatar) -> None:
    frames_file = default_avatar.path / "frames.jpg"
    before = frames_file.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_default_avatar(default_avatar.path.parent.parent)
    assert time.perf_counter() - started < 0.5
    assert frames_file.stat().st_mtime_ns == before
    assert again.num_frames == default_avatar.num_frames
    assert again.meta["builder_version"] == default_mod.BUILDER_VERSION


@dataclass
class _FakeBuild:
    """Stands in for the real build so cache tests take milliseconds."""

    calls: int = 0
    delay: float = 0.0

    def __call__(self, motion: IdleMotion | None = None) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        time.sleep(self.delay)
        return np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 478, 2), np.float32)


def test_default_avatar_is_rebuilt_when_the_builder_version_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeBuild()
    monkeypatch.setattr(default_mod, "build_default", fake)
    ensure_default_avatar(tmp_path)
    info_path = tmp_path / "avatars" / "default" / "avatar.json"
    info = json.loads(info_path.read_text())
    info["builder_version"] = default_mod.BUILDER_VERSION - 1
    info_path.write_text(json.dumps(info))
    ensure_default_avatar(tmp_path)
    assert fake.calls == 2
    assert load_avatar(tmp_path, "default").meta["builder_version"] == default_mod.BUILDER_VERSION


def test_default_avatar_built_once_when_two_callers_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeBuild(delay=0.2)
    monkeypatch.setattr(default_mod, "build_default", fake)
    results: list[Avatar] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_default_avatar(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls == 1
    assert [a.num_frames for a in results] == [2, 2]
    assert list_avatars(tmp_path) == ["default"]


def test_a_users_own_avatar_named_default_is_not_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeBuild()
    monkeypatch.setattr(default_mod, "build_default", fake)
    save_avatar(tmp_path, "default", np.zeros((3, 8, 8, 3), np.uint8), np.zeros((3, 478, 2), np.float32), meta={"builder": "prepare"})
    assert ensure_default_avatar(tmp_path).num_frames == 3
    assert fake.calls == 0


# --- prepare from a video or a picture ------------------------------------------------


def test_prepare_from_a_short_video_keeps_its_frames_and_tracks_the_face(tmp_path: Path) -> None:
    still = default_still()
    video = _write_video(tmp_path / "clip.mp4", [_shifted(still, 2.0 * k) for k in range(10)])
    avatar = prepare_avatar(tmp_path, "clip", video)
    assert 9 <= avatar.num_frames <= 11
    assert avatar.frame_shape == (512, 512, 3)
    assert all(avatar.has_face(i) for i in range(avatar.num_frames))
    moved = avatar.landmarks[-1, MOUTH_LEFT, 0] - avatar.landmarks[0, MOUTH_LEFT, 0]
    assert abs(moved - 2.0 * (avatar.num_frames - 1)) < 4.0, moved
    assert avatar.meta["kind"] == "video"
    assert load_avatar(tmp_path, "clip").num_frames == avatar.num_frames


def test_prepare_shrinks_a_video_to_max_side_and_caps_its_length(tmp_path: Path) -> None:
    still = default_still()
    video = _write_video(tmp_path / "clip.mp4", [still] * 10)
    avatar = prepare_avatar(tmp_path, "small", video, max_seconds=0.2, max_side=256)
    assert avatar.frame_shape == (256, 256, 3)
    assert avatar.num_frames == 5


def test_prepare_from_a_png_gives_an_idle_clip_like_the_default(tmp_path: Path) -> None:
    png = tmp_path / "astronaut.png"
    cv2.imwrite(str(png), cv2.cvtColor(default_still(), cv2.COLOR_RGB2BGR))
    avatar = prepare_avatar(tmp_path, "pic", png)
    assert avatar.frames.shape == (100, 512, 512, 3)
    assert all(avatar.has_face(i) for i in range(avatar.num_frames))
    assert np.abs(avatar.frames[50].astype(np.int16) - avatar.frames[0]).mean() > 0.5
    assert avatar.meta["kind"] == "image"


def test_a_small_face_in_a_wide_frame_is_found_by_looking_closer(
    still_landmarks: tuple[np.ndarray, np.ndarray],
) -> None:
    # A bust in a 16:9 frame: the face is ~7% of the width, too small for MediaPipe's
    # detector on the whole frame.
    still, lm = still_landmarks
    bust = cv2.resize(still, (720, 720), interpolation=cv2.INTER_AREA)
    wide = np.full((720, 1280, 3), 200, np.uint8)
    wide[:, 100:820] = bust
    expected = lm[[MOUTH_LEFT, MOUTH_RIGHT]] * (720 / 512) + np.array([100, 0])
    found = still_landmarks_of(wide)
    assert np.abs(found[[MOUTH_LEFT, MOUTH_RIGHT]] - expected).max() < 4.0
    tracked = video_landmarks(np.stack([wide] * 3))
    assert np.isfinite(tracked).all()
    assert np.abs(tracked[:, [MOUTH_LEFT, MOUTH_RIGHT]] - expected).max() < 4.0


def test_prepare_from_a_picture_without_a_face_says_no_face(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((240, 320, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="no face"):
        prepare_avatar(tmp_path, "grey", grey)
    assert list_avatars(tmp_path) == []


def test_prepare_from_a_video_without_a_face_says_no_face(tmp_path: Path) -> None:
    video = _write_video(tmp_path / "grey.mp4", [np.full((128, 128, 3), 128, np.uint8)] * 3)
    with pytest.raises(ValueError, match="no face"):
        prepare_avatar(tmp_path, "grey", video)


def test_prepare_from_a_file_that_is_not_media_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "notes.mp4"
    junk.write_text("not a video")
    with pytest.raises(ValueError, match="cannot"):
        prepare_avatar(tmp_path, "junk", junk)


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_invalid_avatar_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidAvatarName):
        check_name(name)
    with pytest.raises(InvalidAvatarName):
        prepare_avatar(tmp_path, name, tmp_path / "missing.png")  # the name is checked first
    with pytest.raises(InvalidAvatarName):
        ensure_default_avatar(tmp_path, name)


@dataclass
class _Stamped:
    time: float | None


@pytest.mark.parametrize(
    ("source_fps", "count", "expected"),
    [
        (25, 10, list(range(10))),
        (50, 20, list(range(0, 20, 2))),  # every other frame
        (30, 12, [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]),  # nearest source frame to each tick
    ],
)
def test_video_is_resampled_to_25_fps_by_picking_the_nearest_frame(source_fps: int, count: int, expected: list[int]) -> None:
    frames = [_Stamped(i / source_fps) for i in range(count)]
    picked = list(_pick_frames(iter(frames), float(source_fps), 25, limit=1000))
    assert [frames.index(f) for f in picked] == expected


def test_fit_size_only_shrinks_and_keeps_sizes_even() -> None:
    assert fit_size(1920, 1080, 1280) == (1280, 720)
    assert fit_size(513, 511, 1280) == (512, 510)
    assert fit_size(640, 480, 1280) == (640, 480)


# --- the format and the CLI ----------------------------------------------------------


def test_idle_index_plays_forward_then_backward() -> None:
    def avatar(n: int) -> Avatar:
        return Avatar("t", Path("."), np.zeros((n, 2, 2, 3), np.uint8), np.zeros((n, 478, 2), np.float32))

    assert [avatar(4).idle_index(c) for c in range(9)] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert [avatar(1).idle_index(c) for c in range(3)] == [0, 0, 0]


def test_list_hides_half_written_avatars(tmp_path: Path) -> None:
    save_avatar(tmp_path, "real", np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 478, 2), np.float32))
    half = tmp_path / "avatars" / ".real.abc.tmp"
    half.mkdir()
    (half / "avatar.json").write_text("{}")
    assert list_avatars(tmp_path) == ["real"]


def test_saving_over_an_avatar_replaces_it_and_leaves_no_temporary_folders(tmp_path: Path) -> None:
    for n in (1, 2):
        save_avatar(tmp_path, "a", np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 478, 2), np.float32))
    assert load_avatar(tmp_path, "a").num_frames == 2
    assert sorted(os.listdir(tmp_path / "avatars")) == ["a"]


def test_cli_lists_avatars_and_reports_a_faceless_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_avatar(tmp_path, "one", np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 478, 2), np.float32))
    assert cli_main(["list", "--data-dir", str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.splitlines()  # the table's columns: tests/test_prepare.py
    assert header.split()[:3] == ["NAME", "FRAMES", "SIZE"] and row.split()[:3] == ["one", "1", "4x4"]
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((64, 64, 3), 128, np.uint8))
    assert cli_main(["prepare", "--name", "g", "--source", str(grey), "--data-dir", str(tmp_path)]) == 2
