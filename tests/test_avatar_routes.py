"""Avatars over HTTP: GET /avatars, preparation jobs (POST /avatars uploads and
/digital_human/preprocess) followed and cancelled at /avatars/jobs/{id}, who may replace
what, the upload cap, and /offer naming an avatar that is not there.

In-process (``tests/support/harness.py``); the jobs themselves run in real spawned
processes with MediaPipe, on small clips made from the built-in default avatar's frames.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pytest

from avatars.avatar import avatar_dir, avatars_root, list_avatars, load_avatar
from avatars.clips import add_clip
from avatars.default import DEFAULT_NAME, ensure_default_avatar
from avatars.prepare import prepare_avatar
from server.avatar_jobs import remove_partial
from server.avatar_routes import UPLOAD_DIR
from server.errors import ErrorCode
from tests.support.harness import TINY, Harness, running_server

TOKEN = "avatar-operator-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ENDED = ("done", "failed", "cancelled")


# ---- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def default_frames(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The built-in default avatar (built once) and 16 of its frames (512x512: the face is
    ~90 px wide, enough for the preparation's face check)."""
    data = tmp_path_factory.mktemp("default-avatar")
    avatar = ensure_default_avatar(data)
    try:
        frames = np.stack([np.asarray(avatar.frames[k]) for k in range(16)])
    finally:
        avatar.release()
    return avatar_dir(data, DEFAULT_NAME), frames


@pytest.fixture
def data_dir(tmp_path: Path, default_frames: tuple[Path, np.ndarray]) -> Path:
    """A data directory holding the built-in default avatar (copied, not rebuilt)."""
    shutil.copytree(default_frames[0], avatar_dir(tmp_path, DEFAULT_NAME))
    return tmp_path


@pytest.fixture
async def h(data_dir: Path) -> AsyncIterator[Harness]:
    async with running_server(data_dir) as harness:
        yield harness


def write_video(path: Path, frames: np.ndarray, count: int | None = None) -> Path:
    """An H.264 clip of ``count`` frames cycling through ``frames``."""
    count = len(frames) if count is None else count
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for k in range(count):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frames[k % len(frames)], format="rgb24")))
        out.mux(stream.encode(None))
    return path


def noise_png(height: int = 240, width: int = 320) -> bytes:
    ok, buf = cv2.imencode(".png", np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


async def upload(h: Harness, fields: dict[str, str], file: tuple[str, bytes] | None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData(default_to_multipart=True)
    for key, value in fields.items():
        form.add_field(key, value)
    if file is not None:
        form.add_field("file", file[1], filename=file[0], content_type="application/octet-stream")
    async with h.client.post("/avatars", data=form, headers=headers or {}) as resp:
        return resp.status, await resp.json()


async def job_status(h: Harness, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with h.client.get(f"/avatars/jobs/{job_id}", headers=headers or {}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return dict(body["data"])


async def follow(h: Harness, job_id: str, timeout: float = 60.0,
                 headers: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the job until it ends: its last snapshot and every one seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(await job_status(h, job_id, headers))
        if seen[-1]["state"] in ENDED:
            return seen[-1], seen
        await asyncio.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {seen[-1]['state']} after {timeout} s: {seen[-1]}")


async def listing(h: Harness, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async with h.client.get("/avatars", headers=headers or {}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return dict(body["data"])


def leftovers(data_dir: Path, name: str) -> list[str]:
    return [p.name for p in avatars_root(data_dir).iterdir() if p.name.startswith(f".{name}.")]


def uploads_left(data_dir: Path) -> list[str]:
    folder = data_dir / UPLOAD_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---- the listing -----------------------------------------------------------------------------


async def test_the_listing_shows_every_prepared_avatar_with_its_facts(h: Harness, data_dir: Path,
                                                                       default_frames: tuple[Path, np.ndarray]) -> None:
    video = write_video(data_dir / "clip.mp4", default_frames[1][:10])
    made = prepare_avatar(data_dir, "clip", video)
    wave = write_video(data_dir / "wave.mp4", default_frames[1][:5])
    add_clip(data_dir, "clip", "wave", wave)
    add_clip(data_dir, "clip", "nod", wave, loop=True)
    data = await listing(h)
    assert data["default"] == TINY and data["engine"] == h.manager.config.engine and data["jobs"] == []
    entries = {e["name"]: e for e in data["avatars"]}
    assert set(entries) == {DEFAULT_NAME, TINY, "clip"} == set(list_avatars(data_dir))
    clip = entries["clip"]
    folder = avatar_dir(data_dir, "clip")
    assert (clip["width"], clip["height"], clip["fps"], clip["frames"]) == (512, 512, 25, made.num_frames)
    assert clip["seconds"] == pytest.approx(made.num_frames / 25)
    assert clip["bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert clip["kind"] == "video" and clip["source"] == "clip.mp4"
    assert clip["clips"] == [{"number": 2, "name": "wave", "frames": 5, "seconds": 0.2, "has_audio": False, "loop": False},
                             {"number": 3, "name": "nod", "frames": 5, "seconds": 0.2, "has_audio": False, "loop": True}]
    assert clip["engines"] == {"cpu": True, "musetalk": False} and clip["default"] is False
    assert entries[TINY]["default"] is True and entries[TINY]["frames"] == 8
    assert entries[DEFAULT_NAME]["kind"] == "image" and entries[DEFAULT_NAME]["frames"] == 100

    # MuseTalk material cached under the avatar shows up (the listing notices the change)
    material = folder / "musetalk" / "0123456789abcdef"
    material.mkdir(parents=True)
    (material / "params.json").write_text(json.dumps({"version": "v15", "mask_source": "landmarks", "latent_dtype": "float16"}))
    (material / "latents.npy").write_bytes(b"\0" * 1000)
    clip = next(e for e in (await listing(h))["avatars"] if e["name"] == "clip")
    assert clip["engines"] == {"cpu": True, "musetalk": True}
    assert clip["material"]["musetalk"] == [{"key": "0123456789abcdef", "version": "v15", "mask_source": "landmarks",
                                             "latent_dtype": "float16", "bytes": 1000 + (material / "params.json").stat().st_size}]


async def test_offer_naming_an_unknown_avatar_lists_the_known_ones(h: Harness) -> None:
    status, body = await h.post("/offer", {"sdp": "v=0\r\n", "type": "offer", "avatar": "nobody"})
    assert status == 404 and body["code"] == ErrorCode.UNKNOWN_AVATAR, body
    assert "'nobody'" in body["msg"] and f"known avatars: {DEFAULT_NAME}, {TINY}" in body["msg"]
    assert len(h.manager) == 0


# ---- jobs ----------------------------------------------------------------------------------


async def test_preprocess_answers_at_once_then_reports_progress_and_ends_done(
        h: Harness, data_dir: Path, default_frames: tuple[Path, np.ndarray]) -> None:
    write_video(data_dir / "anna.mp4", default_frames[1], count=60)
    status, body = await h.post("/digital_human/preprocess",
                                {"user_id": "u1", "request_id": "r1", "streamer_id": "anna", "video_path": "anna.mp4"})
    assert status == 200 and body["code"] == 0 and body["user_id"] == "u1" and body["request_id"] == "r1", body
    job = body["data"]  # answered before the work: queued (or just started), no result yet
    assert job["state"] in ("queued", "running") and job["name"] == "anna" and job["result"] is None
    assert job["status_url"] == f"/avatars/jobs/{job['job_id']}"
    assert [j["job_id"] for j in (await listing(h))["jobs"]] == [job["job_id"]]

    final, seen = await follow(h, job["job_id"])
    assert final["state"] == "done" and final["error"] is None, final
    assert any(s["state"] == "running" for s in seen), [s["state"] for s in seen]
    assert all(set(s["progress"]) == {"done", "total", "fraction", "fps", "eta_s"} for s in seen)
    from avatars import prepare

    if "progress" in inspect.signature(prepare.prepare_avatar).parameters:  # stages and counts from prepare_avatar
        assert any(s["progress"]["total"] > 0 and s["stage"] not in ("queued", "starting") for s in seen), seen
    assert final["progress"]["fraction"] == 1.0 and final["stage"] == "done" and final["progress"]["eta_s"] is None
    result = final["result"]
    assert result["name"] == "anna" and result["frames"] == 60 and result["kind"] == "video" and result["source"] == "anna.mp4"
    assert "anna" in {e["name"] for e in (await listing(h))["avatars"]} and (await listing(h))["jobs"] == []
    assert load_avatar(data_dir, "anna").num_frames == 60
    assert h.manager.avatar("anna").num_frames == 60  # sessions can open on it now

    # the seed's clients call /gen right after /preprocess: it waits for the job (here: a second one)
    status, body = await h.post("/digital_human/preprocess", {"user_id": "u1", "request_id": "r2", "streamer_id": "anna",
                                                              "video_path": "anna.mp4", "overwrite": True, "wait": True})
    assert status == 200 and body["data"]["state"] == "done", body


async def test_a_picture_without_a_face_ends_failed_with_the_reason(h: Harness, data_dir: Path) -> None:
    status, body = await upload(h, {"name": "noise"}, ("noise.png", noise_png()))
    assert status == 202 and body["data"]["state"] in ("queued", "running"), body
    final, _ = await follow(h, body["data"]["job_id"])
    assert final["state"] == "failed" and "no face" in final["error"] and "noise.png" in final["error"], final
    assert final["result"] is None and final["source"] == "noise.png"
    assert "noise" not in list_avatars(data_dir) and leftovers(data_dir, "noise") == []
    assert uploads_left(data_dir) == []  # the upload goes with its job

    status, body = await upload(h, {"name": "junk"}, ("junk.mp4", b"this is not a video at all" * 100))
    final, _ = await follow(h, body["data"]["job_id"])
    assert final["state"] == "failed" and "cannot" in final["error"], final
    # the failure is remembered: asking for the avatar says why it is not there
    status, body = await h.post("/offer", {"sdp": "v=0\r\n", "type": "offer", "avatar": "junk"})
    assert status == 404 and "its preparation failed" in body["msg"], body


async def test_malformed_uploads_are_refused_at_once(h: Harness) -> None:
    png = ("a.png", noise_png())
    cases: list[tuple[dict[str, str], tuple[str, bytes] | None, int, str]] = [
        ({"name": "anna"}, None, 400, "missing file field 'file'"),
        ({}, png, 400, "missing field 'name'"),
        ({"name": ".hidden"}, png, 400, "invalid avatar name"),
        ({"name": "anna", "fps": "0"}, png, 400, "'fps' must be an integer from 1 to 60"),
        ({"name": "anna", "fps": "2.5"}, png, 400, "'fps'"),
        ({"name": "anna", "max_seconds": "500"}, png, 400, "'max_seconds'"),
        ({"name": "anna", "max_side": "-3"}, png, 400, "'max_side'"),
        ({"name": "anna", "replace": "maybe"}, png, 400, "'replace' must be true or false"),
        ({"name": "anna"}, ("empty.mp4", b""), 400, "empty"),
    ]
    for fields, file, status, words in cases:
        got, body = await upload(h, fields, file)
        assert got == status and words in body["msg"], (fields, got, body)
    async with h.client.post("/avatars", json={"name": "anna"}) as resp:
        body = await resp.json()
        assert resp.status == 400 and "multipart/form-data" in body["msg"]
    assert uploads_left(Path(h.manager.config.data_dir)) == []
    assert (await listing(h))["jobs"] == []
    async with h.client.get("/avatars/jobs/nope") as resp:
        assert resp.status == 404 and (await resp.json())["code"] == ErrorCode.NOT_FOUND
    async with h.client.delete("/avatars/jobs/nope") as resp:
        assert resp.status == 404


async def test_existing_and_default_avatars_are_replaced_only_when_asked(h: Harness, data_dir: Path) -> None:
    png = ("a.png", noise_png())
    for name, words in ((TINY, "the server's default avatar"), (DEFAULT_NAME, "the built-in avatar")):
        status, body = await upload(h, {"name": name}, png)
        assert status == 409 and body["code"] == ErrorCode.CONFLICT and words in body["msg"], body
        assert "replace=true" in body["msg"]
    (data_dir / "clip.mp4").write_bytes(b"not read before the checks")
    base = {"user_id": "u", "request_id": "r", "video_path": "clip.mp4"}
    status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": DEFAULT_NAME})
    assert status == 409 and "built-in" in body["msg"] and '"replace": true' in body["msg"], body
    status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": TINY})
    assert status == 409 and "overwrite" in body["msg"], body
    assert uploads_left(data_dir) == [] and (await listing(h))["jobs"] == []

    # asked: a job (this one fails, a noise picture has no face) and the avatar stays as it was
    status, body = await upload(h, {"name": TINY, "replace": "true"}, png)
    assert status == 202, body
    final, _ = await follow(h, body["data"]["job_id"])
    assert final["state"] == "failed" and load_avatar(data_dir, TINY).num_frames == 8


async def test_with_a_token_only_the_operator_replaces_an_avatar(data_dir: Path) -> None:
    png = ("a.png", noise_png())
    async with running_server(data_dir, token=TOKEN) as guarded:
        status, body = await upload(guarded, {"name": TINY, "replace": "true"}, png)
        assert status == 401 and body["code"] == ErrorCode.UNAUTHORIZED, body
        status, body = await upload(guarded, {"name": TINY, "replace": "true"}, png, {"Authorization": "Bearer wrong"})
        assert status == 403 and body["code"] == ErrorCode.FORBIDDEN, body
        status, body = await upload(guarded, {"name": TINY}, png, BEARER)
        assert status == 409 and "with the operator's token" in body["msg"], body
        status, body = await upload(guarded, {"name": TINY, "replace": "true"}, png, BEARER)
        assert status == 202, body
        final, _ = await follow(guarded, body["data"]["job_id"], headers=BEARER)
        assert final["state"] == "failed"


async def test_an_upload_past_the_cap_is_413_and_leaves_nothing(data_dir: Path) -> None:
    cap = 100_000
    async with running_server(data_dir, max_avatar_upload_bytes=cap) as h:
        big = ("big.mp4", b"\0" * (3 * cap))
        status, body = await upload(h, {"name": "big"}, big)  # announced by Content-Length: refused before reading
        assert status == 413 and body["code"] == ErrorCode.PAYLOAD_TOO_LARGE and "--max-avatar-upload-bytes" in body["msg"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while streamed to disk
            yield b'--xx\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
            yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n\r\n'
            for _ in range(6):
                yield b"\0" * (cap // 2)
            yield b"\r\n--xx--\r\n"

        async with h.client.post("/avatars", data=chunked(),
                                 headers={"Content-Type": "multipart/form-data; boundary=xx"}) as resp:
            body = await resp.json()
            assert resp.status == 413 and "--max-avatar-upload-bytes" in body["msg"], body
        status, body = await upload(h, {"name": "small"}, ("small.png", noise_png(96, 128)))  # under the cap: taken
        assert status == 202, body
        await follow(h, body["data"]["job_id"])
        assert uploads_left(data_dir) == []
        assert "big" not in list_avatars(data_dir)


async def test_cancel_kills_the_job_and_leaves_no_partial_avatar(data_dir: Path,
                                                                 default_frames: tuple[Path, np.ndarray]) -> None:
    long_clip = write_video(data_dir / "long.mp4", default_frames[1], 500)
    async with running_server(data_dir, max_avatar_jobs=2) as h:
        base = {"user_id": "u", "request_id": "r", "video_path": long_clip.name}
        status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "long"})
        assert status == 200, body
        first = body["data"]["job_id"]
        # a replacement of an existing avatar, queued behind it
        status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": TINY, "replace": True})
        assert status == 200 and body["data"]["state"] == "queued" and body["data"]["queue_position"] == 1, body
        second = body["data"]["job_id"]
        status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "third"})
        assert status == 429 and body["code"] == ErrorCode.TOO_MANY_REQUESTS and "--max-avatar-jobs" in body["msg"], body
        status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "long"})
        assert status == 409 and first in body["msg"], body

        while (await job_status(h, first))["state"] != "running":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # into the work
        async with h.client.delete(f"/avatars/jobs/{first}") as resp:
            body = await resp.json()
            assert resp.status == 200 and body["data"]["state"] == "cancelled", body
        assert "long" not in list_avatars(data_dir) and leftovers(data_dir, "long") == []
        async with h.client.delete(f"/avatars/jobs/{first}") as resp:
            assert resp.status == 409 and "already ended" in (await resp.json())["msg"]

        # the queued replacement now runs; cancelled midway, the avatar it was replacing stays
        while (await job_status(h, second))["state"] != "running":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        async with h.client.delete(f"/avatars/jobs/{second}") as resp:
            assert resp.status == 200 and (await resp.json())["data"]["state"] == "cancelled"
        assert load_avatar(data_dir, TINY).num_frames == 8 and leftovers(data_dir, TINY) == []

        # shutdown kills a running job promptly
        status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "late"})
        while (await job_status(h, body["data"]["job_id"]))["state"] != "running":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0
    assert "late" not in list_avatars(data_dir) and leftovers(data_dir, "late") == []


def test_a_killed_preparation_leaves_the_previous_avatar_or_nothing(tmp_path: Path) -> None:
    root = avatars_root(tmp_path)
    # killed after moving the old avatar aside, before renaming the new one in: the old one comes back
    old = root / ".anna.abcd1234.old"
    old.mkdir(parents=True)
    (old / "avatar.json").write_text("{}")
    (old / ".landmarks.npy.0a1b2c3d.tmp").write_bytes(b"half")  # a file being replaced in place
    (root / ".anna.efgh5678.tmp").mkdir()
    (root / ".anna.mnop3456.frames.tmp").write_bytes(b"scratch")
    (root / ".anna.b.ijkl9012.tmp").mkdir()  # another avatar's ("anna.b"): not touched
    remove_partial(tmp_path, "anna")
    assert sorted(p.name for p in (root / "anna").iterdir()) == ["avatar.json"]
    assert sorted(p.name for p in root.iterdir()) == [".anna.b.ijkl9012.tmp", "anna"]
