"""Preparing an avatar from a user's own source: face checks, frames without a face,
partial re-preparation, progress, and the command line's prepare and list."""
from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatars import prepare as prepare_mod
from avatars.__main__ import main as cli_main
from avatars.avatar import list_avatars, load_avatar
from avatars.default import default_still
from avatars.face_check import (
    BRIDGE_28,
    BRIDGE_29,
    BRIDGE_30,
    DetectorSettings,
    NoUsableFace,
    bbox_shift_range,
    carry_landmarks,
    face_boxes,
    index_ranges,
)
from avatars.landmarks import MOUTH_LEFT
from avatars.prepare import (
    LANDMARKS_ONLY,
    PREPARED,
    UP_TO_DATE,
    FrameParams,
    SourceChanged,
    prepare,
    prepare_avatar,
    still_landmarks,
)
from avatars.progress import Progress, ProgressDisplay
from tests.support.avatar_video import face_clip, move, write_video


def _png(path: Path, rgb: np.ndarray) -> Path:
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 40-frame videos of the astronaut (differing only in their noise frames) and
    the frames of the first as a folder of pictures."""
    folder = tmp_path_factory.mktemp("sources")
    still = default_still()
    lm = still_landmarks(still)
    (x1, y1), (x2, y2) = lm.min(axis=0).astype(int).tolist(), lm.max(axis=0).astype(int).tolist()
    box = (x1, y1, x2, y2)
    clip = face_clip(still, box)
    assert clip.without_face == [0, 1, 16, 17, 26, 27, 28, 29]
    other = face_clip(still, box, seed=1)
    return {
        "clip": write_video(folder / "clip.mp4", clip.frames),
        "other": write_video(folder / "other.mp4", other.frames),
    }


# --- faces -------------------------------------------------------------------------------


def test_a_video_with_faceless_frames_keeps_every_frame_and_carries_their_landmarks(sources: dict[str, Path], tmp_path: Path) -> None:
    avatar = prepare_avatar(tmp_path, "clip", sources["clip"])
    assert avatar.num_frames == 40
    assert avatar.landmarks.shape == (40, 478, 2)
    assert np.isfinite(avatar.landmarks).all()
    boxes = face_boxes(avatar.landmarks)
    assert boxes.shape == (40, 4) and np.isfinite(boxes).all()
    # blank 0-1, noise 16-17, the face covered 26-29
    assert avatar.meta["carried_frames"] == [[0, 1], [16, 17], [26, 29]]
    assert avatar.meta["frames_without_face"] == 8
    lm = avatar.landmarks
    assert np.allclose(lm[0], lm[2]) and np.allclose(lm[1], lm[2])  # the first face's, copied back
    assert np.allclose(lm[16], lm[15] + (lm[18] - lm[15]) / 3, atol=1e-3)
    assert np.allclose(lm[17], lm[15] + 2 * (lm[18] - lm[15]) / 3, atol=1e-3)
    assert np.allclose(lm[27], lm[25] + 2 * (lm[30] - lm[25]) / 5, atol=1e-3)
    # The face drifts right 1.5 px a frame and grows: the mouth corner follows it.
    mouth_x = lm[:, MOUTH_LEFT, 0]
    assert np.all(np.diff(mouth_x[2:16]) > 0)
    faces = avatar.meta["faces"]
    assert faces["ok"] == 32 and faces["no-face"] + faces["not-human"] == 8
    assert 90 < faces["median_width_px"] < 115
    assert abs(faces["median_yaw_deg"]) < 10


def test_the_cat_photo_is_refused_saying_it_is_no_human_face(tmp_path: Path) -> None:
    from skimage import data

    cat = _png(tmp_path / "chelsea.png", data.chelsea())
    with pytest.raises(NoUsableFace, match="no human face where the face landmarks landed") as caught:
        prepare_avatar(tmp_path, "cat", cat)
    message = str(caught.value)
    assert "chelsea.png" in message
    assert "A good source shows one real human face, frontal" in message and "at least 80 px wide" in message
    assert list_avatars(tmp_path) == []


def test_the_astronaut_photo_is_accepted_with_a_face_in_every_frame(tmp_path: Path) -> None:
    avatar = prepare_avatar(tmp_path, "astronaut", _png(tmp_path / "astronaut.png", default_still()))
    assert avatar.meta["kind"] == "image"
    assert avatar.meta["carried_frames"] == []
    assert avatar.meta["faces"]["median_score"] > 0.9
    assert avatar.meta["faces"]["box"] == pytest.approx([179, 71, 271, 177], abs=3)


def test_a_face_under_80_px_is_refused_as_too_small(tmp_path: Path) -> None:
    small = _png(tmp_path / "small.png", cv2.resize(default_still(), (256, 256), interpolation=cv2.INTER_AREA))
    with pytest.raises(NoUsableFace, match=r"the face is too small: 4\d px wide, need at least 80 px"):
        prepare_avatar(tmp_path, "small", small)
    # The same picture passes when the operator asks for less.
    avatar = prepare_avatar(tmp_path, "small", small, detector=DetectorSettings(min_face_px=40))
    assert avatar.num_frames == 100


def test_a_face_turned_away_is_refused_as_turned(tmp_path: Path) -> None:
    from skimage import data

    # scikit-image's cameraman, a three-quarter view (~50 degrees), enlarged so it is not too small
    camera = cv2.resize(np.stack([data.camera()] * 3, axis=-1), (1536, 1536), interpolation=cv2.INTER_CUBIC)
    with pytest.raises(NoUsableFace, match=r"turned away from the camera: about \d+ degrees, at most 40"):
        prepare_avatar(tmp_path, "camera", _png(tmp_path / "camera.png", camera))


def test_a_shrunk_video_is_judged_by_the_face_size_of_its_source(sources: dict[str, Path], tmp_path: Path) -> None:
    # max_side 256 halves the ~95 px face, but the source had it large enough.
    avatar = prepare_avatar(tmp_path, "half", sources["clip"], max_side=256)
    assert avatar.frame_shape == (256, 256, 3)
    assert avatar.meta["faces"]["median_width_px"] > 90


def test_a_folder_of_pictures_is_a_clip_in_name_order(tmp_path: Path) -> None:
    still = default_still()
    folder = tmp_path / "pics"
    folder.mkdir()
    for k in range(1, 13):  # frame1 ... frame12: frame10 comes after frame9, not after frame1
        _png(folder / f"frame{k}.png", move(still, 3.0 * k))
    (folder / "notes.txt").write_text("not a picture")
    avatar = prepare_avatar(tmp_path, "pics", folder, fps=12)
    assert avatar.num_frames == 12 and avatar.fps == 12
    assert avatar.meta["kind"] == "images" and avatar.meta["source"] == "pics/"
    steps = np.diff(avatar.landmarks[:, MOUTH_LEFT, 0])
    assert np.all((steps > 1.5) & (steps < 4.5)), steps


# --- preparing again ---------------------------------------------------------------------


def test_preparing_again_reuses_the_frames_and_redoes_only_what_changed(sources: dict[str, Path], tmp_path: Path) -> None:
    first = prepare(tmp_path, "clip", sources["clip"])
    assert first.action == PREPARED
    folder = first.avatar.path
    frames_mtime = (folder / "frames.jpg").stat().st_mtime_ns
    landmarks_mtime = (folder / "landmarks.npy").stat().st_mtime_ns

    again = prepare(tmp_path, "clip", sources["clip"])
    assert again.action == UP_TO_DATE
    assert (folder / "landmarks.npy").stat().st_mtime_ns == landmarks_mtime
    assert "is up to date" in prepare_mod.summary(again)

    changed = prepare(tmp_path, "clip", sources["clip"], detector=DetectorSettings(min_face_score=0.8))
    assert changed.action == LANDMARKS_ONLY
    assert (folder / "frames.jpg").stat().st_mtime_ns == frames_mtime
    assert (folder / "landmarks.npy").stat().st_mtime_ns != landmarks_mtime
    reloaded = load_avatar(tmp_path, "clip")
    assert reloaded.meta["prepare"]["detector"]["min_face_score"] == 0.8
    assert reloaded.meta["carried_frames"] == first.avatar.meta["carried_frames"]
    # found again on the stored (JPEG) frames: the same face to the detector's jitter
    assert np.abs(reloaded.landmarks - first.avatar.landmarks).mean() < 0.5

    # A longer max_seconds does not cut this 1.6 s clip differently: still the same frames.
    assert prepare(tmp_path, "clip", sources["clip"], max_seconds=90, detector=DetectorSettings(min_face_score=0.8)).action == UP_TO_DATE
    # Another frame size needs new frames.
    resized = prepare(tmp_path, "clip", sources["clip"], max_side=256, detector=DetectorSettings(min_face_score=0.8))
    assert resized.action == PREPARED and resized.avatar.width == 256


def test_a_different_source_for_an_existing_name_is_refused_unless_replace(sources: dict[str, Path], tmp_path: Path) -> None:
    prepare_avatar(tmp_path, "anna", sources["clip"])
    with pytest.raises(SourceChanged, match=r"made from clip\.mp4.*other\.mp4 would replace it.*--replace"):
        prepare_avatar(tmp_path, "anna", sources["other"])
    assert load_avatar(tmp_path, "anna").meta["source"] == "clip.mp4"
    result = prepare(tmp_path, "anna", sources["other"], replace=True)
    assert result.action == PREPARED
    assert result.avatar.meta["source"] == "other.mp4"


def test_replace_prepares_everything_again_from_the_same_source(sources: dict[str, Path], tmp_path: Path) -> None:
    first = prepare_avatar(tmp_path, "clip", sources["clip"])
    before = (first.path / "frames.jpg").stat().st_ino
    result = prepare(tmp_path, "clip", sources["clip"], replace=True)
    assert result.action == PREPARED
    assert (result.avatar.path / "frames.jpg").stat().st_ino != before


def test_a_long_clip_waits_in_a_scratch_file_that_is_removed(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_mod, "SCRATCH_BYTES", 0)  # every clip counts as long
    avatar = prepare_avatar(tmp_path, "clip", sources["clip"])
    assert avatar.num_frames == 40
    assert sorted(p.name for p in (tmp_path / "avatars").iterdir()) == ["clip"]


def test_a_30_second_video_is_not_cut(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), k % 256, np.uint8) for k in range(750)]
    video = write_video(tmp_path / "long.mp4", frames)
    info = prepare_mod.identify_source(video)
    scratch = prepare_mod._Scratch(tmp_path, "long")
    meta: dict[str, object] = {}
    decoded, cut = prepare_mod._decode_video(info, FrameParams(), scratch, None, meta)
    assert len(decoded) == 750 and not cut


# --- progress ----------------------------------------------------------------------------


def test_progress_is_reported_per_stage_with_increasing_counts_ending_at_the_total(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    seen: list[Progress] = []
    prepare_avatar(tmp_path, "clip", sources["clip"], progress=seen.append)
    stages = list(dict.fromkeys(p.stage for p in seen))
    assert stages == ["decode", "landmarks", "faces", "save"]
    for stage in stages:
        reports = [p for p in seen if p.stage == stage]
        done = [p.done for p in reports]
        assert done == sorted(done) and done[0] == 0
        assert reports[-1].done == reports[-1].total == 40
        assert all(p.done <= p.total for p in reports)
        assert [p.elapsed_s for p in reports] == sorted(p.elapsed_s for p in reports)
    assert seen[-1].eta_s == 0.0


def test_progress_display_redraws_one_line_on_a_terminal_and_logs_lines_elsewhere() -> None:
    tty = io.StringIO()
    display = ProgressDisplay(tty, tty=True)
    for done in (0, 10, 20):
        display(Progress("landmarks", done, 20, elapsed_s=done / 10))
    text = tty.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "10/20 frames" in text and "10.0 frames/s" in text and "1 s left" in text

    log = io.StringIO()
    display = ProgressDisplay(log, tty=False, log_every_s=60)
    for done in range(21):
        display(Progress("decode", done, 20, elapsed_s=done / 10))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 2 and lines[-1].startswith("decode") and "20/20 frames" in lines[-1]


# --- the pieces --------------------------------------------------------------------------


def test_carried_landmarks_are_interpolated_between_neighbours_and_copied_at_the_ends() -> None:
    lm = np.zeros((7, 2, 2), np.float32)
    lm[1], lm[4] = 10.0, 40.0
    lm[[0, 2, 3, 5, 6]] = np.nan
    has = np.array([False, True, False, False, True, False, False])
    out = carry_landmarks(lm, has)
    assert out[:, 0, 0].tolist() == [10.0, 10.0, 20.0, 30.0, 40.0, 40.0, 40.0]
    assert index_ranges(np.flatnonzero(~has)) == [[0, 0], [2, 3], [5, 6]]


def test_bbox_shift_range_is_musetalks_on_the_astronaut() -> None:
    lm = still_landmarks(default_still())
    minus, plus = bbox_shift_range(lm[None])
    # y29 - y28 and y30 - y29 on a 512 px portrait: a few pixels each
    assert -12 < minus < 0 < plus < 12


def test_bbox_shift_points_are_the_ones_the_musetalk_engine_maps() -> None:
    pytest.importorskip("torch")  # the engine's package imports it
    from pipeline.engines.musetalk.material import MEDIAPIPE_TO_68

    assert (MEDIAPIPE_TO_68[28], MEDIAPIPE_TO_68[29], MEDIAPIPE_TO_68[30]) == (BRIDGE_28, BRIDGE_29, BRIDGE_30)


# --- the command line ----------------------------------------------------------------------


def test_cli_list_with_no_avatars_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no avatars under")
    assert "python -m avatars prepare VIDEO_OR_PICTURE --name NAME" in out


def test_cli_prepares_from_a_positional_source_and_lists_it(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tmp_path)
    assert cli_main(["prepare", str(sources["clip"]), "--name", "anna", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert out.startswith("avatar 'anna' prepared from clip.mp4")
    assert "40 = 1.6 s at 25 fps" in out and "512x512" in out
    assert "face box    x1=" in out
    assert "8 frames, landmarks carried from their neighbours: 0-1, 16-17, 26-29" in out
    assert "bbox_shift  MuseTalk v1.0: -" in out

    assert cli_main(["prepare", "--source", str(sources["clip"]), "--name", "anna", "--data-dir", data]) == 0
    assert "is up to date" in capsys.readouterr().out
    assert cli_main(["prepare", str(sources["other"]), "--name", "anna", "--data-dir", data]) == 2

    assert cli_main(["list", "--data-dir", data]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "FRAMES", "SIZE", "FPS", "SECONDS", "DISK_MB", "CLIPS", "KIND", "SOURCE"]
    name, frames, size, fps, seconds, disk_mb, clips, kind, source = row.split()
    assert (name, frames, size, fps, seconds, clips, kind, source) == ("anna", "40", "512x512", "25", "1.6", "0", "video", "clip.mp4")
    assert 0.5 < float(disk_mb) < 20
    info = json.loads((tmp_path / "avatars" / "anna" / "avatar.json").read_text())
    assert info["prepare"]["frames"] == {"fps": 25, "max_seconds": 60.0, "max_side": 1280}
