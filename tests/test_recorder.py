"""Recordings report failures honestly: one that cannot start (no space, an impossible
path) fails at once with a message that says why; one that fails part way is logged and
reported by ``finish``, and leaves no unplayable file behind."""
from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

import server.recorder
from media.mp4 import Mp4Writer
from media.timing import SAMPLES_PER_FRAME
from server.errors import ErrorCode
from server.frames import MediaFrame
from server.recorder import QUEUE_FRAMES, Recorder, RecordingError
from tests.support.harness import Harness, running_server

W, H = 64, 48


def frame(i: int) -> MediaFrame:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    audio = (rng.standard_normal(SAMPLES_PER_FRAME) * 3000).astype(np.int16)
    return MediaFrame(i, image, audio, None)


def low_disk(free: int) -> Any:
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        return real(path)._replace(free=free)

    return disk_usage


def test_a_recording_writes_every_frame_it_is_given(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec" / "a.mp4", W, H)
    for i in range(30):
        recorder.add(frame(i))
    path = recorder.finish()
    with av.open(str(path)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 30
    assert recorder.frames == 30 and recorder.dropped == 0


def test_the_file_is_open_and_its_header_written_before_the_constructor_returns(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "b.mp4", W, H)
    try:
        assert (tmp_path / "b.mp4").stat().st_size > 0
    finally:
        recorder.finish()


def test_a_full_device_fails_the_start_at_once(tmp_path: Path) -> None:
    (tmp_path / "full.mp4").symlink_to("/dev/full")  # every write: ENOSPC
    started = time.monotonic()
    with pytest.raises(RecordingError) as info:
        Recorder(tmp_path / "full.mp4", W, H)
    assert time.monotonic() - started < 2
    assert info.value.no_space and "no space left on the device" in info.value.msg
    assert info.value.code == ErrorCode.INSUFFICIENT_STORAGE and info.value.status == 507


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.recorder.shutil, "disk_usage", low_disk(3 * 2**20))
    with pytest.raises(RecordingError, match=r"no space left on the device .*3\.0 MiB free") as info:
        Recorder(tmp_path / "c.mp4", W, H)
    assert info.value.no_space
    assert not (tmp_path / "c.mp4").exists()


@pytest.mark.parametrize("where", ["under a file", "a directory"])
def test_a_path_that_cannot_be_written_fails_the_start_and_says_so(tmp_path: Path, where: str) -> None:
    # (the suite may run as root, for whom permissions do not stop a write: impossible paths do)
    (tmp_path / "plain").write_text("not a directory")
    (tmp_path / "taken.mp4").mkdir()
    path = tmp_path / "plain" / "d.mp4" if where == "under a file" else tmp_path / "taken.mp4"
    with pytest.raises(RecordingError, match="could not start the recording") as info:
        Recorder(path, W, H)
    assert not info.value.no_space
    assert str(path.parent if where == "under a file" else path) in info.value.msg


def test_running_out_of_space_part_way_is_logged_and_reported_by_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write = Mp4Writer.write

    def filling_up(self: Mp4Writer, image: Any, audio: Any) -> None:
        if self.frames >= 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        write(self, image, audio)

    monkeypatch.setattr(Mp4Writer, "write", filling_up)
    path = tmp_path / "e.mp4"
    recorder = Recorder(path, W, H)
    for i in range(8):
        recorder.add(frame(i))
    deadline = time.monotonic() + 5
    while recorder.error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # logged when it happens, not only when someone ends the recording
    logged = [r for r in caplog.records if r.name == "server.recorder" and r.levelno == logging.ERROR]
    assert logged and "no space left" in logged[0].getMessage(), caplog.records
    started = time.monotonic()
    for i in range(2 * QUEUE_FRAMES):  # the player's sink never blocks on a failed recording
        recorder.add(frame(i % 4))
    assert time.monotonic() - started < 1
    with pytest.raises(RecordingError, match="no space left on the device .* after 5 frames") as info:
        recorder.finish()
    assert info.value.no_space
    assert not path.exists(), "the unplayable partial file was left behind"


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


async def test_start_record_on_a_full_disk_is_an_error_reply_and_the_session_can_record_later(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    with monkeypatch.context() as m:
        m.setattr(server.recorder.shutil, "disk_usage", low_disk(0))
        status, body = await h.post("/record", {"sessionid": sid, "type": "start_record"})
    assert status == 507 and body["code"] == ErrorCode.INSUFFICIENT_STORAGE, body
    assert "no space left on the device" in body["msg"]
    status, body = await h.post("/record", {"sessionid": sid, "type": "end_record"})
    assert status == 409, body  # it never started
    status, body = await h.post("/record", {"sessionid": sid, "type": "start_record"})
    assert status == 200 and body["code"] == 0, body
    await h.until(lambda: viewer.session._recorder is not None and viewer.session._recorder.frames > 3)
    status, body = await h.post("/record", {"sessionid": sid, "type": "end_record"})
    assert status == 200 and body["code"] == 0, body
