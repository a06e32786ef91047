"""Who may do what: the operator's token, each session's secret, browser Origins and
CORS, /stats without session ids, and avatars that are not replaced by accident.
In-process (``tests/support/harness.py``)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from server.errors import ErrorCode
from tests.support.harness import Harness, running_server

TOKEN = "s3cret-operator-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path) as harness:
        yield harness


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path, token=TOKEN) as harness:
        yield harness


async def test_knowing_a_session_id_is_not_enough_to_drive_it(h: Harness) -> None:
    await h.viewer()  # the default session: anyone may address it as 0, so its id needs no secret either
    viewer = await h.viewer()
    sid = viewer.session.id
    async with h.client.post("/human", json={"sessionid": sid, "text": "Hijack."}) as resp:
        body = await resp.json()
    assert resp.status == 403 and body["code"] == ErrorCode.FORBIDDEN and "secret" in body["msg"]
    async with h.client.post("/human", json={"sessionid": sid, "text": "Hijack.", "secret": "wrong"}) as resp:
        assert resp.status == 403
    for how in ({"json": {"sessionid": sid, "text": "Mine.", "secret": viewer.session.secret}},
                {"json": {"sessionid": sid, "text": "Mine."}, "headers": {"X-Session-Secret": viewer.session.secret}}):
        async with h.client.post("/human", **how) as resp:
            assert resp.status == 200
    async with h.client.post(f"/is_speaking?secret={viewer.session.secret}", json={"sessionid": sid}) as resp:
        assert resp.status == 200
    async with h.client.ws_connect(f"/humanecho?sessionid={sid}") as ws:
        refused = await ws.receive_json(timeout=5)
        assert refused["event"] == "error" and refused["code"] == ErrorCode.FORBIDDEN


async def test_the_default_session_stays_the_seeds_single_user_convenience(h: Harness) -> None:
    await h.viewer()
    async with h.client.post("/human", json={"sessionid": 0, "text": "Seed style."}) as resp:
        assert resp.status == 200


async def test_stats_show_no_session_ids_without_the_token(h: Harness, guarded: Harness) -> None:
    viewer = await h.viewer()
    async with h.client.get("/stats") as resp:
        text = await resp.text()
    assert resp.status == 200 and viewer.session.id not in text
    other = await guarded.viewer()
    async with guarded.client.get("/stats", headers=BEARER) as resp:
        assert other.session.id in await resp.text()


async def test_with_a_token_every_control_route_needs_it(guarded: Harness) -> None:
    viewer = await guarded.viewer()
    async with guarded.client.post("/human", json={"sessionid": 0, "text": "hi"}) as resp:
        body = await resp.json()
    assert resp.status == 401 and body["code"] == ErrorCode.UNAUTHORIZED and "Bearer" in body["msg"]
    async with guarded.client.post("/human", json={"sessionid": 0, "text": "hi"}, headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 403
    for path in ("/stats", "/record/whatever", "/humanecho"):
        async with guarded.client.get(path) as resp:
            assert resp.status == 401, path
    # the operator's token drives any session, by id or as the default one (the seed's examples with the token added)
    async with guarded.client.post("/human", json={"sessionid": viewer.session.id, "text": "hi"}, headers=BEARER) as resp:
        assert resp.status == 200
    async with guarded.client.post(f"/is_speaking?token={TOKEN}", json={"sessionid": 0}) as resp:
        assert resp.status == 200
    # what a browser loads before it has a token stays open
    for path in ("/digital_human/check", "/webrtcapi.html", "/client.js"):
        async with guarded.client.get(path) as resp:
            assert resp.status == 200, path


async def test_browser_requests_from_other_origins_are_refused(h: Harness, tmp_path: Path) -> None:
    await h.viewer()
    # the cross-site POST a foreign page can make without a preflight
    foreign = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    async with h.client.post("/human", data='{"sessionid": 0, "text": "pwned"}', headers=foreign) as resp:
        assert resp.status == 403 and "--cors-origins" in (await resp.json())["msg"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:  # a foreign page's WebSocket
        await h.client.ws_connect("/humanecho", headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    # the server's own pages, and curl without a content type (the seed's examples), pass
    own = f"http://{h.client.host}:{h.client.port}"
    async with h.client.post("/human", data='{"sessionid": 0, "text": "ok"}', headers={"Origin": own}) as resp:
        assert resp.status == 200
    async with h.client.post("/human", data='{"sessionid": 0, "text": "ok"}', skip_auto_headers=["Content-Type"]) as resp:
        assert resp.status == 200


async def test_allowed_origins_get_cors_headers_and_preflights(tmp_path: Path) -> None:
    async with running_server(tmp_path, cors_origins=["https://app.example"]) as h:
        await h.viewer()
        headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        async with h.client.options("/human", headers=headers) as resp:
            assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "X-Session-Secret" in resp.headers["Access-Control-Allow-Headers"]
        async with h.client.post("/human", json={"sessionid": 0, "text": "hi"}, headers={"Origin": "https://app.example"}) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_a_recording_downloads_with_the_session_secret_only(h: Harness) -> None:
    viewer = await h.viewer()
    await h.post("/record", {"sessionid": viewer.session.id, "type": "start_record"})
    await asyncio.sleep(0.3)  # a few frames recorded
    _status, body = await h.post("/record", {"sessionid": viewer.session.id, "type": "end_record"})
    url = body["data"]["url"]
    async with h.client.get(url) as resp:
        assert resp.status == 200
    async with h.client.get(url.split("?")[0]) as resp:
        assert resp.status == 403


async def test_preprocess_replaces_an_avatar_or_the_default_only_when_asked(h: Harness) -> None:
    base = {"user_id": "u", "request_id": "r", "video_path": "nothing.mp4"}
    data_dir = Path(h.manager.config.data_dir)
    (data_dir / "clip.mp4").write_bytes(b"not read before the checks")
    status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "default", "video_path": "clip.mp4"})
    assert status == 409 and "built-in" in body["msg"]
    status, body = await h.post("/digital_human/preprocess", {**base, "streamer_id": "tiny", "video_path": "clip.mp4"})
    assert status == 409 and "overwrite" in body["msg"]


async def test_the_default_sessions_own_id_needs_no_secret_as_0_needs_none(h: Harness) -> None:
    first = await h.viewer()
    async with h.client.post("/set_audiotype", json={"sessionid": first.session.id, "audiotype": 0}) as resp:
        assert resp.status == 200


async def test_a_page_sending_only_the_sessionid_drives_its_own_session_by_the_offers_cookie(h: Harness) -> None:
    await h.viewer()  # someone else's session is the default one
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with h.client.post("/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as resp:
            sid = (await resp.json())["sessionid"]
            cookie = resp.cookies[f"lipsync_secret_{sid}"]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        # LiveTalking's page: {audiotype, sessionid: String(sessionid)}, and the browser's cookie
        async with h.client.post("/set_audiotype", json={"audiotype": 0, "sessionid": str(sid)}) as resp:
            assert resp.status == 200
        url = str(h.client.make_url("/set_audiotype"))
        async with aiohttp.ClientSession() as stranger, stranger.post(url, json={"audiotype": 0, "sessionid": sid}) as resp:
            assert resp.status == 403  # the id alone, from elsewhere
    finally:
        await pc.close()
