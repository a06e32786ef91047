"""The batch routes: prepare an avatar from a video, render an answer to mp4, and keep
every path inside the data directory."""
from __future__ import annotations

import fractions
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
from skimage import data as skdata

from tests.support.media_analysis import wav_bytes

pytestmark = pytest.mark.slow


def write_video(path: Path, frames: int = 12) -> None:
    still = skdata.astronaut()
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 512, 512, "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.roll(still, i, axis=1), format="rgb24")
            f.pts, f.time_base = i, fractions.Fraction(1, 25)
            c.mux(s.encode(f))
        c.mux(s.encode(None))


async def post(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        return r.status, await r.json()


async def test_preprocess_then_gen_writes_an_mp4_inside_the_data_dir(server, data_dir: Path) -> None:
    uploads = data_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    write_video(uploads / "anchor.mp4")
    t = np.arange(int(16000 * 1.3)) / 16000
    (uploads / "answer.wav").write_bytes(wav_bytes(0.3 * np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 3 * t) > 0)))
    ids = {"user_id": "u1", "request_id": "r1"}
    status, body = await post(server.url + "/digital_human/preprocess",
                              {**ids, "streamer_id": "anchor", "video_path": "uploads/anchor.mp4", "overwrite": True})
    assert status == 200 and body["code"] == 0 and body["user_id"] == "u1" and body["request_id"] == "r1"
    status, body = await post(server.url + "/digital_human/gen",
                              {**ids, "streamer_id": "anchor", "tts_path": "uploads/answer.wav", "chunk_id": 3})
    assert status == 200 and body["code"] == 0, body
    out = Path(body["digital_human_mp4_path"])
    assert out.is_absolute() and out.is_file() and out.resolve().is_relative_to(data_dir.resolve())
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == int(np.ceil(1.3 * 25))


@pytest.mark.parametrize("field", ["video_path", "tts_path"])
async def test_paths_outside_the_data_dir_are_refused(server, field: str) -> None:
    route = "/digital_human/preprocess" if field == "video_path" else "/digital_human/gen"
    for bad in ["/etc/passwd", "../../etc/passwd", "uploads/../../x.wav"]:
        status, body = await post(server.url + route, {"user_id": "u", "request_id": "r", "streamer_id": "anchor", field: bad})
        assert status == 400 and body["code"] == 1105 and "inside the data directory" in body["msg"], body


async def test_missing_files_ids_and_avatars_are_clear_errors(server) -> None:
    status, body = await post(server.url + "/digital_human/gen",
                              {"user_id": "u", "request_id": "r", "streamer_id": "nobody", "tts_path": "nothing.wav"})
    assert status == 404 and "does not exist" in body["msg"]
    status, body = await post(server.url + "/digital_human/preprocess",
                              {"user_id": "u/..", "request_id": "r", "streamer_id": "a", "video_path": "x.mp4"})
    assert status == 400 and "user_id" in body["msg"]
    status, body = await post(server.url + "/digital_human/preprocess", {"request_id": "r", "streamer_id": "a", "video_path": "x.mp4"})
    assert status == 400 and "missing field 'user_id'" in body["msg"]
