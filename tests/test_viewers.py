"""One session, several viewers: ``POST /offer`` with ``watch`` answers a receive-only peer
fed by the session's own player. Real aiortc clients against the in-process server
(``tests/support/harness.py``): both get the same speaking frames at the same time, the
worker renders them once, a viewer leaving leaves the session, the session closing closes
its viewers, and the bounds and access rules hold."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from server.errors import ErrorCode
from tests.support.client import ApiFailure, AvatarClient, ReceivedVideo
from tests.support.fake_worker import colour_of
from tests.support.harness import Harness, running_server
from tests.support.media_analysis import video_index

SENTENCE = "Both of you see this sentence."


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path, max_viewers=2) as harness:
        yield harness


def url(h: Harness) -> str:
    return str(h.client.make_url("")).rstrip("/")


def showing(client: AvatarClient, utterance: str) -> list[ReceivedVideo]:
    """The frames a client received that show ``utterance`` (the fake worker paints it one grey)."""
    level = colour_of(utterance)
    return [v for v in client.received.video if v.image is not None and abs(int(v.image[16, 16, 1]) - level) <= 3]


async def offer_sdp() -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_two_peers_get_the_same_frames_at_the_same_time_rendered_once(h: Harness) -> None:
    async with AvatarClient(url(h)) as owner, AvatarClient(url(h)) as viewer:
        sid = await owner.connect()
        assert await viewer.connect(watch=sid, secret=owner.secret) == sid
        session = h.manager.get(sid, owner.secret)
        assert len(h.manager) == 1 and len(session.viewers) == 1, "a viewer is not a session"
        rendered_before = h.worker.frames_sent
        utterance = (await owner.say(SENTENCE))["data"]["utterance"]
        await owner.wait_speaking(True, timeout=5)
        await owner.wait_speaking(False, timeout=20)
        await asyncio.sleep(0.5)
        mine, theirs = showing(owner, utterance), showing(viewer, utterance)
        frames = h.tts.samples_for(SENTENCE) // 640  # type: ignore[attr-defined]
        assert len(mine) >= frames - 2 and abs(len(mine) - len(theirs)) <= 2, (len(mine), len(theirs), frames)
        # the same media frames: consecutive runs of the same length, and they arrive together
        assert abs(mine[0].t - theirs[0].t) < 0.1 and abs(mine[-1].t - theirs[-1].t) < 0.1
        runs = [video_index(v.pts) for v in theirs]
        assert runs == list(range(runs[0], runs[0] + len(runs))), "the viewer missed or repeated speaking frames"
        # rendered once: the worker sent the utterance's frames once, not once per peer
        assert h.worker.frames_sent - rendered_before <= frames + 2


async def test_a_viewer_leaving_leaves_the_session_and_the_session_closing_closes_its_viewers(h: Harness) -> None:
    async with AvatarClient(url(h)) as owner:
        sid = await owner.connect()
        session = h.manager.get(sid, owner.secret)
        async with AvatarClient(url(h)) as viewer:
            await viewer.connect(watch=sid, secret=owner.secret)
            assert len(session.viewers) == 1
        await h.until(lambda: len(session.viewers) == 0, timeout=10)
        assert not session.closed and len(h.manager) == 1
        before = len(owner.received.video)
        await asyncio.sleep(0.3)
        assert len(owner.received.video) > before, "the session's own peer stopped receiving"
        async with AvatarClient(url(h)) as viewer:
            await viewer.connect(watch=sid, secret=owner.secret)
            viewer_pc = next(iter(session.viewers._viewers.values())).pc
            await h.manager.close(sid)
            assert len(session.viewers) == 0 and viewer_pc.connectionState == "closed"
            await asyncio.sleep(0.5)
            count = len(viewer.received.video)
            await asyncio.sleep(0.5)
            assert len(viewer.received.video) == count, "the viewer still receives after the session closed"


async def test_viewers_are_bounded_per_session(h: Harness) -> None:
    async with AvatarClient(url(h)) as owner:
        sid = await owner.connect()
        clients = [AvatarClient(url(h)) for _ in range(3)]
        try:
            for client in clients[:2]:
                await client.connect(watch=sid, secret=owner.secret)
            with pytest.raises(ApiFailure) as refused:
                await clients[2].connect(watch=sid, secret=owner.secret)
            assert refused.value.status == 429 and refused.value.body["code"] == ErrorCode.TOO_MANY_REQUESTS
            assert "max-viewers" in refused.value.body["msg"]
        finally:
            for client in clients:
                await client.close()


async def test_watching_needs_the_sessions_secret_or_the_token_and_the_default_session_needs_neither(tmp_path: Path) -> None:
    async with running_server(tmp_path) as h:
        first, second = await h.viewer(), await h.viewer()
        sdp = await offer_sdp()
        for body, status, code in (
            ({"watch": "nope"}, 404, ErrorCode.UNKNOWN_SESSION),
            ({"watch": second.session.id}, 403, ErrorCode.FORBIDDEN),
            ({"watch": second.session.id, "secret": "wrong"}, 403, ErrorCode.FORBIDDEN),
            ({"watch": second.session.id, "avatar": "tiny"}, 400, ErrorCode.INVALID_FIELD),
            ({"watch": second.session.id, "secret": second.session.secret}, 200, 0),
            ({"watch": 0}, 200, 0),  # the default session (the oldest)
        ):
            async with h.client.post("/offer", json={"sdp": sdp, "type": "offer", **body}) as resp:
                reply = await resp.json()
            assert resp.status == status, (body, reply)
            if status != 200:
                assert reply["code"] == code
            else:
                watched = second.session.id if body["watch"] else first.session.id
                assert reply["sessionid"] == watched and reply["watching"] is True and "secret" not in reply
        assert len(h.manager) == 2
        started = time.monotonic()
        await h.manager.close_all()  # viewers that never connected go with their sessions
        assert time.monotonic() - started < 5
    async with running_server(tmp_path, token="tok") as h:
        session = await h.viewer()
        async with h.client.post("/offer", json={"sdp": await offer_sdp(), "type": "offer", "watch": session.session.id},
                                 headers={"Authorization": "Bearer tok"}) as resp:
            assert resp.status == 200, await resp.text()  # the operator may watch any session
