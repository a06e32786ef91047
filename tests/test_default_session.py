"""Addressing sessions the seed's way (``sessionid`` 0, "0", absent or null is the default
session), the WebSocket without a sessionid, ``audiotype`` as the seed sends it, paths
as the seed writes them, and unknown routes; in-process (``tests/support/harness.py``)."""
from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from media.timing import SAMPLE_RATE
from server.errors import ErrorCode
from tests.support.harness import Harness, running_server
from tests.support.media_analysis import wav_bytes


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


@pytest.mark.parametrize("sessionid", [0, "0", None, "absent"])
async def test_sessionid_0_or_none_addresses_the_only_open_session(h: Harness, sessionid: object) -> None:
    viewer = await h.viewer()
    body: dict[str, object] = {"text": "Hello there."}
    if sessionid != "absent":
        body["sessionid"] = sessionid
    status, reply = await h.post("/human", body)
    assert status == 200, reply
    assert reply["data"]["utterance"].startswith(viewer.session.id)
    _s, speaking = await h.post("/is_speaking", {"sessionid": sessionid} if sessionid != "absent" else {})
    assert speaking["data"] is True


async def test_with_several_sessions_open_the_default_is_the_oldest(h: Harness) -> None:
    first, _second = await h.viewer(), await h.viewer()
    _s, reply = await h.post("/human", {"sessionid": 0, "text": "Which one?"})
    assert reply["data"]["utterance"].startswith(first.session.id)
    await h.manager.close(first.session.id)
    _s, reply = await h.post("/human", {"sessionid": 0, "text": "And now?"})
    assert reply["data"]["utterance"].startswith(_second.session.id)


async def test_with_no_session_open_the_default_is_a_json_404_saying_to_open_one(h: Harness) -> None:
    status, reply = await h.post("/is_speaking", {"sessionid": 0})
    assert status == 404 and reply["code"] == ErrorCode.UNKNOWN_SESSION and "POST /offer" in reply["msg"]


async def test_a_multi_user_server_has_no_default_session(tmp_path: Path) -> None:
    async with running_server(tmp_path, default_session=False) as h:
        viewer = await h.viewer()
        status, reply = await h.post("/human", {"sessionid": 0, "text": "hi"})
        assert status == 404 and "--no-default-session" in reply["msg"]
        status, _reply = await h.post("/human", {"sessionid": viewer.session.id, "text": "hi"})
        assert status == 200


async def test_the_websocket_without_a_sessionid_binds_the_default_session(h: Harness) -> None:
    viewer = await h.viewer()
    async with h.client.ws_connect("/humanecho") as ws:  # as the seed's client connects
        await ws.send_str("Hello, Avatar!")
        queued = await ws.receive_json(timeout=5)
        assert queued["event"] == "queued" and queued["sessionid"] == viewer.session.id


async def test_a_websocket_that_cannot_bind_is_told_why_then_closed(h: Harness) -> None:
    async with h.client.ws_connect("/humanecho") as ws:
        error = await ws.receive_json(timeout=5)
        assert error["event"] == "error" and error["code"] == ErrorCode.UNKNOWN_SESSION and "POST /offer" in error["msg"]
        closing = await ws.receive(timeout=5)
        assert closing.type.name in ("CLOSE", "CLOSED", "CLOSING")
    async with h.client.get("/humanecho?sessionid=nope") as resp:  # plain HTTP: the JSON error
        assert resp.status == 404 and (await resp.json())["code"] == ErrorCode.UNKNOWN_SESSION


@pytest.mark.parametrize(
    ("audiotype", "expected"),
    [
        (0, {"audiotype": 0, "switched": True}),
        ("0", {"audiotype": 0, "switched": True}),
        ("stereo", {"audiotype": "stereo", "switched": False}),  # the seed's example: nothing to switch
    ],
)
async def test_audiotype_takes_numbers_numeric_strings_and_names(h: Harness, audiotype: object, expected: dict[str, object]) -> None:
    await h.viewer()
    status, reply = await h.post("/set_audiotype", {"sessionid": 0, "audiotype": audiotype, "reinit": False})
    assert status == 200 and reply["code"] == 0
    assert {k: reply["data"][k] for k in expected} == expected
    if audiotype == "stereo":
        assert "no action clip named 'stereo'" in reply["data"]["reason"]


async def test_audiotype_that_is_neither_number_nor_name_is_a_clear_400(h: Harness) -> None:
    await h.viewer()
    for bad in ([1], {"a": 1}, True, ""):
        status, reply = await h.post("/set_audiotype", {"sessionid": 0, "audiotype": bad})
        assert status == 400 and reply["code"] in (ErrorCode.INVALID_FIELD, ErrorCode.MISSING_FIELD), (bad, reply)


async def test_unknown_paths_are_404_whatever_the_method_and_known_ones_405(h: Harness) -> None:
    async with h.client.post("/no/such/thing", json={}) as resp:
        assert resp.status == 404 and (await resp.json())["code"] == ErrorCode.NOT_FOUND
    async with h.client.get("/human") as resp:
        assert resp.status == 405 and "use POST" in (await resp.json())["msg"]
    async with h.client.post("/stats", json={}) as resp:
        assert resp.status == 405 and "use GET" in (await resp.json())["msg"]


async def test_gen_takes_paths_as_the_seed_writes_them_from_the_server_directory(h: Harness, tmp_path: Path) -> None:
    data_dir = Path(h.manager.config.data_dir)
    (data_dir / "audio").mkdir(exist_ok=True)
    (data_dir / "audio" / "yongen.wav").write_bytes(wav_bytes(0.2 * np.ones(SAMPLE_RATE // 5)))
    here = os.getcwd()
    os.chdir(data_dir.parent)  # the server's working directory, with the data dir below it
    try:
        seed_style = f"{data_dir.name}/audio/yongen.wav"  # "data/audio/yongen.wav" with the default data dir
        body = {"user_id": "user123", "request_id": "req123", "streamer_id": "tiny", "tts_path": seed_style, "chunk_id": 0}
        status, reply = await h.post("/digital_human/gen", body)
        assert status == 200, reply
        body["tts_path"] = "audio/yongen.wav"  # relative to the data dir: as before
        assert (await h.post("/digital_human/gen", body))[0] == 200
        body["tts_path"] = f"{data_dir.name}/../../outside.wav"  # outside read from either place
        status, reply = await h.post("/digital_human/gen", body)
        assert status == 400 and reply["code"] == ErrorCode.PATH_OUTSIDE_DATA
    finally:
        os.chdir(here)
    await asyncio.sleep(0)
