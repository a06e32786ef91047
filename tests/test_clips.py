"""Action clips: added from a video (the CLI and ``POST /avatars/{name}/clips``), chosen with
``/set_audiotype`` by LiveTalking's numbers or by name, played with their sound, left for
speech, cross-faded at every switch. In-process (``tests/support/harness.py``): the clips
are a few frames of solid colour made here, so what the viewer shows can be told apart by
its pixels (the tiny avatar's idle frames are grey below 40, the fake worker's speech grey
from 64)."""
from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from avatars.__main__ import main as avatars_cli
from avatars.avatar import load_avatar, save_avatar
from avatars.clips import ClipError, ClipExists, add_clip
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from server.errors import ErrorCode
from server.frames import MediaFrame
from server.player import FADE_FRAMES
from tests.support.harness import TINY, TINY_SIZE, Harness, Viewer, running_server, tiny_avatar

GREEN = (30, 200, 60)
BLUE = (30, 60, 200)
TOKEN = "clip-token"


def make_video(colours: list[tuple[int, int, int]], size: tuple[int, int] = (64, 64), fps: int = 25,
               tone_hz: float | None = 440.0) -> bytes:
    """An mp4 (H.264, and AAC when ``tone_hz``) of one solid colour per frame: width x height."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        assert isinstance(video, av.VideoStream)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        video.options = {"crf": "4", "preset": "ultrafast"}
        audio = out.add_stream("aac", rate=SAMPLE_RATE, layout="mono") if tone_hz else None
        for i, colour in enumerate(colours):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), colour, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None and tone_hz is not None:
            assert isinstance(audio, av.AudioStream)
            n = round(len(colours) / fps * SAMPLE_RATE)
            tone = (0.4 * np.sin(2 * np.pi * tone_hz * np.arange(n) / SAMPLE_RATE)).astype(np.float32)
            for start in range(0, n, 1024):
                piece = av.AudioFrame.from_ndarray(tone[None, start : start + 1024], format="fltp", layout="mono")
                piece.sample_rate, piece.pts, piece.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
                out.mux(audio.encode(piece))
            out.mux(audio.encode(None))
    return buf.getvalue()


def rgb(image: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (round(float(v)) for v in image.reshape(-1, 3).mean(axis=0))
    return r, g, b


def near(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb(image), colour, strict=True))


def grey(image: np.ndarray) -> bool:
    r, g, b = rgb(image)
    return max(r, g, b) - min(r, g, b) <= 6


def record(viewer: Viewer) -> list[MediaFrame]:
    """Every frame the session's player decides, in order (as a recorder sees them)."""
    frames: list[MediaFrame] = []
    viewer.session.player.add_sink(frames.append)
    return frames


def loud(pcm: np.ndarray) -> bool:
    return int(np.abs(pcm.astype(np.int32)).max()) > 3000


async def upload(h: Harness, name: str, video: bytes, avatar: str = TINY, headers: dict[str, str] | None = None,
                 **fields: object) -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("clip", name)
    for key, value in fields.items():
        form.add_field(key, str(value).lower() if isinstance(value, bool) else str(value))
    form.add_field("file", video, filename=f"{name}.mp4", content_type="video/mp4")
    async with h.client.post(f"/avatars/{avatar}/clips", data=form, headers=headers or {}) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


# ---- making clips ----
def test_a_clip_is_fitted_to_the_avatar_and_listed_with_the_next_livetalking_number(tmp_path: Path) -> None:
    tiny_avatar(tmp_path)
    src = tmp_path / "wave.mp4"
    src.write_bytes(make_video([GREEN] * 12 + [BLUE] * 12, size=(66, 64), fps=50))  # 0.48 s at 50 fps, a little wider
    clip = add_clip(tmp_path, TINY, "wave", src)
    assert clip.info() == {"name": "wave", "number": 2, "frames": 12, "seconds": 0.48, "has_audio": True, "loop": False}
    avatar = load_avatar(tmp_path, TINY)
    assert avatar.meta["clips"] == [clip.info()] and [c.name for c in avatar.clips] == ["wave"]
    loaded = avatar.clips[0]
    assert loaded.frames.shape == (12, TINY_SIZE, TINY_SIZE, 3)  # resampled to 25 fps, scaled and cropped
    assert all(near(loaded.frames[i], GREEN) for i in range(6)) and all(near(loaded.frames[i], BLUE) for i in range(6, 12))
    sound = [loaded.audio_at(i) for i in range(12)]
    assert all(s is not None and s.size == SAMPLES_PER_FRAME for s in sound) and sum(loud(s) for s in sound if s is not None) >= 10

    silent = add_clip(tmp_path, TINY, "nod", make_video([BLUE] * 5, tone_hz=None), loop=True)
    assert (silent.number, silent.has_audio, silent.loop, silent.audio_at(0)) == (3, False, True, None)
    with pytest.raises(ClipExists, match="already has a clip named 'nod'"):
        add_clip(tmp_path, TINY, "nod", src)
    with pytest.raises(ClipExists, match="number 2 is taken by clip 'wave'"):
        add_clip(tmp_path, TINY, "other", src, number=2)
    assert add_clip(tmp_path, TINY, "nod", src, replace=True).info()["number"] == 3  # keeps its number
    assert add_clip(tmp_path, TINY, "leave", src, number=7).number == 7
    assert [c["number"] for c in load_avatar(tmp_path, TINY).meta["clips"]] == [2, 3, 7]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"video": make_video([GREEN] * 3, size=(64, 32))}, "shapes differ by 100%"),
        ({"video": make_video([GREEN] * 3, size=(16, 16))}, "too small"),
        ({"video": b"not a video at all"}, "not a readable video"),
        ({"number": 1}, "idle loop"),
        ({"number": 0}, "idle loop"),
        ({"name": "2nd"}, "starting with a letter"),
    ],
)
def test_clips_that_cannot_fit_are_refused_with_a_reason(tmp_path: Path, kwargs: dict, words: str) -> None:
    tiny_avatar(tmp_path)
    video = kwargs.get("video", make_video([GREEN] * 3))
    with pytest.raises(ClipError, match=words):
        add_clip(tmp_path, TINY, kwargs.get("name", "bad"), video, number=kwargs.get("number"))
    assert load_avatar(tmp_path, TINY).clips == []
    leftovers = list((tmp_path / "avatars" / TINY / "clips").glob("*")) if (tmp_path / "avatars" / TINY / "clips").is_dir() else []
    assert [p.name for p in leftovers if not p.name.startswith(".lock")] == []


def test_the_cli_adds_a_clip(tmp_path: Path) -> None:
    tiny_avatar(tmp_path)
    src = tmp_path / "think.mp4"
    src.write_bytes(make_video([BLUE] * 10))
    data = ["--data-dir", str(tmp_path)]
    assert avatars_cli(["add-clip", TINY, "--clip", "think", str(src), "--number", "3", "--loop", *data]) == 0
    assert avatars_cli(["add-clip", TINY, "--clip", "think", str(src), *data]) == 2  # exists: --replace
    assert avatars_cli(["add-clip", TINY, "--clip", "think", str(src), "--once", "--replace", *data]) == 0
    assert avatars_cli(["add-clip", "nobody", "--clip", "think", str(src), *data]) == 2
    info = json.loads((tmp_path / "avatars" / TINY / "avatar.json").read_text())
    assert info["clips"] == [{"name": "think", "number": 3, "frames": 10, "seconds": 0.4, "has_audio": True, "loop": False}]


# ---- playing them ----
async def test_livetalkings_audiotype_2_plays_the_clip_once_with_its_sound_cross_faded_both_ways(h: Harness) -> None:
    viewer = await h.viewer()
    frames = record(viewer)
    status, body = await upload(h, "wave", make_video([GREEN] * 6 + [BLUE] * 6))
    assert status == 200, body
    assert body["data"] == {"avatar": TINY, "name": "wave", "number": 2, "frames": 12, "seconds": 0.48, "has_audio": True,
                            "loop": False}
    await h.until(lambda: len(frames) >= 3)  # the idle loop is on air
    # what LiveTalking's page sends: its default audiotype 2, the sessionid as a string, no reinit
    status, body = await h.post("/set_audiotype", {"audiotype": 2, "sessionid": str(viewer.session.id)})
    assert status == 200 and body["data"] == {"audiotype": 2, "switched": True, "reinit": False, "clip": "wave"}
    start = len(frames)
    await h.until(lambda: sum(near(f.image, BLUE) for f in frames) >= 6 and grey(frames[-1].image) and rgb(frames[-1].image)[0] < 40)
    assert viewer.session.player.clip is None and viewer.session.audiotype == 0  # played once: back to idle

    switch = next(i for i in range(start, len(frames)) if not grey(frames[i].image))
    before, fade_in = frames[switch - 1], frames[switch : switch + FADE_FRAMES]
    greens = [rgb(f.image)[1] for f in [before, *fade_in]] + [GREEN[1]]
    assert all(a < b for a, b in pairwise(greens)), f"not a monotonic blend: {greens}"
    for k, f in enumerate(fade_in, start=1):  # linear: old * (1 - k/6) + new * k/6
        expected = rgb(before.image)[1] * (1 - k / (FADE_FRAMES + 1)) + GREEN[1] * k / (FADE_FRAMES + 1)
        assert abs(rgb(f.image)[1] - expected) <= 3, (k, rgb(f.image), expected)
    clip_frames = frames[switch : switch + 12]
    assert sum(near(f.image, GREEN) for f in clip_frames) == 6 - FADE_FRAMES and sum(near(f.image, BLUE) for f in clip_frames) == 6
    assert all(f.utterance_id is None for f in clip_frames) and sum(loud(f.audio) for f in clip_frames) >= 10  # its sound
    fade_out = [rgb(f.image)[2] for f in frames[switch + 11 : switch + 12 + FADE_FRAMES + 1]]
    assert all(a > b for a, b in pairwise(fade_out)), f"no fade back to idle: {fade_out}"
    assert not any(loud(f.audio) for f in frames[switch + 12 :])

    # the viewer saw the clip's pixels, and heard it while they were on
    await h.until(lambda: viewer.video and viewer.video[-1][0] >= frames[-1].index)
    blue_at_viewer = [n for n, image in viewer.video if near(image, BLUE)]
    assert len(blue_at_viewer) >= 4
    assert all(loud(viewer.audio[2 * n]) or loud(viewer.audio[2 * n + 1]) for n in blue_at_viewer if 2 * n + 1 < len(viewer.audio))


async def test_a_looping_clip_by_name_plays_until_switched_back_and_reinit_restarts_it(h: Harness) -> None:
    viewer = await h.viewer()
    frames = record(viewer)
    ramp = [(30, 60 + 14 * i, 60) for i in range(10)]  # each frame its own green level
    assert (await upload(h, "nod", make_video(ramp, tone_hz=None), loop="true"))[0] == 200
    status, body = await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": "nod"})
    assert status == 200 and body["data"]["clip"] == "nod" and body["data"]["audiotype"] == 2
    start = len(frames)
    await h.until(lambda: len(frames) - start >= 25)
    played = [rgb(f.image)[1] for f in frames[start + FADE_FRAMES + 1 : start + 25]]
    assert max(played) >= 180 and sum(1 for a, b in pairwise(played) if b < a - 50) >= 1  # came round again
    assert viewer.session.audiotype == 2

    await h.until(lambda: rgb(frames[-1].image)[1] >= 150)  # late in the ramp
    status, body = await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": "nod", "reinit": False})
    assert status == 200 and body["data"]["switched"] is True  # the clip on air plays on
    assert viewer.session.set_clip("nod", reinit=True)["reinit"] is True  # what /set_audiotype calls, at a known frame
    restart = len(frames)
    await h.until(lambda: len(frames) - restart >= 3)
    # from its first frame at once (a restart is no switch of picture: no cross-fade), and on
    assert [rgb(f.image)[1] for f in frames[restart : restart + 3]] == pytest.approx([g for _r, g, _b in ramp[:3]], abs=4)

    status, body = await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": 0})
    assert status == 200 and body["data"] == {"audiotype": 0, "switched": True, "reinit": False, "clip": None}
    back = len(frames)
    await h.until(lambda: len(frames) - back >= FADE_FRAMES + 3)
    assert all(grey(f.image) and rgb(f.image)[0] < 40 for f in frames[back + FADE_FRAMES + 1 :])
    assert not all(grey(f.image) for f in frames[back : back + FADE_FRAMES])  # faded, not cut


async def test_speech_during_a_clip_shows_talking_frames_then_the_idle_loop(h: Harness) -> None:
    viewer = await h.viewer()
    frames = record(viewer)
    assert (await upload(h, "listen", make_video([GREEN] * 8), loop=True))[0] == 200
    await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": "listen"})
    await h.until(lambda: bool(frames) and near(frames[-1].image, GREEN))
    _status, body = await h.post("/human", {"sessionid": viewer.session.id, "text": "An answer."})
    utterance = body["data"]["utterance"]
    await h.until(lambda: not viewer.session.is_speaking)
    await h.until(lambda: len(frames) > max(i for i, f in enumerate(frames) if f.utterance_id == utterance) + FADE_FRAMES + 3)
    spoken = [i for i, f in enumerate(frames) if f.utterance_id == utterance]
    assert len(viewer.shown(utterance)) >= len(spoken) - FADE_FRAMES - 1  # the viewer saw the talking frames
    assert near(frames[spoken[0] - 1].image, GREEN) and not near(frames[spoken[0]].image, GREEN)  # the clip, then a fade
    assert all(grey(f.image) for f in frames[spoken[0] + FADE_FRAMES : spoken[-1] + 1])
    assert all(grey(f.image) and rgb(f.image)[0] < 40 for f in frames[spoken[-1] + 1 :])  # idle after, not the clip
    assert viewer.session.player.clip is None


async def test_a_clip_chosen_while_speaking_starts_when_the_speech_stops(h: Harness) -> None:
    viewer = await h.viewer()
    frames = record(viewer)
    assert (await upload(h, "wave", make_video([GREEN] * 8)))[0] == 200
    _status, body = await h.post("/human", {"sessionid": viewer.session.id, "text": "Wait for me to finish."})
    utterance = body["data"]["utterance"]
    await h.until(lambda: any(f.utterance_id == utterance for f in frames))
    status, _ = await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": 2})
    assert status == 200
    await h.until(lambda: not viewer.session.is_speaking and any(near(f.image, GREEN) for f in frames))
    last_spoken = max(i for i, f in enumerate(frames) if f.utterance_id == utterance)
    first_green = next(i for i, f in enumerate(frames) if near(f.image, GREEN))
    assert first_green == last_spoken + FADE_FRAMES + 1  # right after the speech, through a fade


async def test_unknown_clips_are_a_400_listing_the_clips_and_the_seeds_stereo_still_passes(h: Harness) -> None:
    viewer = await h.viewer()
    sid = viewer.session.id
    assert (await upload(h, "wave", make_video([GREEN] * 4)))[0] == 200
    assert (await upload(h, "think", make_video([BLUE] * 4, tone_hz=None), number=5, loop=True))[0] == 200
    for audiotype in (9, "9", "dance", -1):
        status, body = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": audiotype})
        assert status == 400 and body["code"] == ErrorCode.INVALID_FIELD, body
        assert "2 'wave' (once, with sound), 5 'think' (loops)" in body["msg"] and "0 or 1 is the idle loop" in body["msg"]
    status, body = await h.post("/set_audiotype", {"sessionid": 0, "audiotype": "stereo", "reinit": False})  # the seed's example
    assert status == 200 and body["data"]["switched"] is False and "'stereo'" in body["data"]["reason"]
    status, body = await h.post("/set_audiotype", {"sessionid": sid, "audiotype": 1})  # LiveTalking's "silence"
    assert status == 200 and body["data"]["switched"] is True and body["data"]["clip"] is None


async def test_interrupt_stops_a_clip(h: Harness) -> None:
    viewer = await h.viewer()
    assert (await upload(h, "loop", make_video([GREEN] * 4), loop=True))[0] == 200
    await h.post("/set_audiotype", {"sessionid": viewer.session.id, "audiotype": "loop"})
    assert viewer.session.player.clip is not None
    status, _ = await h.post("/interrupt_talk", {"sessionid": viewer.session.id})
    assert status == 200 and viewer.session.player.clip is None


async def test_the_clip_route_checks_its_input_and_needs_the_token(tmp_path: Path) -> None:
    async with running_server(tmp_path, token=TOKEN) as h:
        video = make_video([GREEN] * 4)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert (await upload(h, "wave", video))[0] == 401
        status, body = await upload(h, "wave", video, headers=bearer)
        assert status == 200 and body["data"]["number"] == 2
        status, body = await upload(h, "wave", video, headers=bearer)
        assert status == 409 and "replace" in body["msg"]
        assert (await upload(h, "wave", video, headers=bearer, replace=True))[0] == 200
        status, body = await upload(h, "wave", video, avatar="nobody", headers=bearer)
        assert status == 404 and body["code"] == ErrorCode.UNKNOWN_AVATAR
        status, body = await upload(h, "wave", make_video([GREEN] * 3, size=(64, 32)), headers=bearer, replace=True)
        assert status == 400 and "shapes differ" in body["msg"]
        status, body = await upload(h, "wave", video, headers=bearer, number=1, replace=True)
        assert status == 400 and "idle loop" in body["msg"]
        async with h.client.post(f"/avatars/{TINY}/clips", json={"clip": "x"}, headers=bearer) as resp:
            assert resp.status == 400 and "multipart" in (await resp.json())["msg"]


def test_preparing_the_avatar_again_keeps_its_clips_when_they_still_fit(tmp_path: Path) -> None:
    tiny_avatar(tmp_path)
    src = tmp_path / "wave.mp4"
    src.write_bytes(make_video([GREEN] * 6))
    add_clip(tmp_path, TINY, "wave", src)
    before = load_avatar(tmp_path, TINY)
    save_avatar(tmp_path, TINY, np.asarray(before.frames)[::-1].copy(), before.landmarks[::-1].copy())  # same size
    again = load_avatar(tmp_path, TINY)
    assert [c.name for c in again.clips] == ["wave"] and near(again.clips[0].frames[0], GREEN)
    bigger = np.zeros((4, TINY_SIZE * 2, TINY_SIZE * 2, 3), np.uint8)
    save_avatar(tmp_path, TINY, bigger, np.zeros((4, 478, 2), np.float32))  # the clip no longer fits: dropped
    assert load_avatar(tmp_path, TINY).clips == [] and not (load_avatar(tmp_path, TINY).path / "clips").exists()
