"""``GET /events``: the session's events as server-sent events, the same JSON as the
WebSocket's, heartbeats, the end with the session, access as for the WebSocket; and, over
real WebRTC with a real server process, speaking_started arriving with the first speaking
frame (the bar: within 100 ms of it at the client)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from media.timing import FRAME_S, VIDEO_TICKS_PER_FRAME
from server.errors import ErrorCode
from tests.support.client import AvatarClient, ServerSentEvents
from tests.support.harness import Harness, running_server
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with running_server(tmp_path, events_heartbeat_s=0.2) as harness:
        yield harness


async def open_events(h: Harness, query: str, headers: dict[str, str] | None = None) -> ServerSentEvents:
    response = await h.client.get(f"/events?{query}", headers=headers or {})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return ServerSentEvents(response).start()


async def test_events_stream_queued_started_ended_as_the_websocket_sends_them(h: Harness) -> None:
    viewer = await h.viewer()
    sid, secret = viewer.session.id, viewer.session.secret
    sse = await open_events(h, f"sessionid={sid}&secret={secret}")
    async with h.client.ws_connect(f"/humanecho?sessionid={sid}&secret={secret}") as ws:
        await asyncio.sleep(0.05)  # both subscribed
        utterance = viewer.session.say("Events, please.")
        from_ws = []
        while not from_ws or from_ws[-1]["event"] != "speaking_ended":
            from_ws.append(await ws.receive_json(timeout=5))
    await sse.until(lambda e: e.kind == "speaking_ended")
    from_sse = [e for e in sse.events if e.kind != "closed"]
    assert [e.kind for e in from_sse] == ["queued", "speaking_started", "speaking_ended"]
    assert [e.data for e in from_sse] == from_ws, "the same JSON objects on both"
    assert all(e.kind == e.data["event"] and e.data["utterance"] == utterance for e in from_sse)
    ended = from_sse[-1].data
    assert ended["text"] == "Events, please." and ended["interrupted"] is False
    assert from_sse[1].data["text"] == "Events, please."
    await sse.close()


async def test_events_carry_an_interrupt_keep_the_stream_alive_and_end_with_the_session(h: Harness) -> None:
    viewer = await h.viewer()
    sse = await open_events(h, f"sessionid={viewer.session.id}", {"X-Session-Secret": viewer.session.secret})
    await asyncio.sleep(0.5)
    assert sse.comments.count("keep-alive") >= 2, sse.comments  # every 0.2 s here
    utterance = viewer.session.say("A long sentence that will not be finished, because it is cut off halfway through.")
    await sse.until(lambda e: e.kind == "speaking_started")
    viewer.session.interrupt()
    ended = await sse.until(lambda e: e.kind == "speaking_ended")
    assert ended.data["utterance"] == utterance and ended.data["interrupted"] is True
    await h.manager.close(viewer.session.id)
    await sse.until(lambda e: e.kind == "closed")
    await asyncio.wait_for(sse.ended.wait(), 2)  # the stream ends with the session
    await sse.close()


async def test_events_need_what_the_websocket_needs(tmp_path: Path) -> None:
    async with running_server(tmp_path, token="tok") as h:
        viewer = await h.viewer()
        sid, secret = viewer.session.id, viewer.session.secret
        for query, headers, status, code in (
            (f"sessionid={sid}&secret={secret}", {}, 401, ErrorCode.UNAUTHORIZED),
            (f"sessionid={sid}&token=tok&secret=wrong", {}, 200, 0),  # the token holder may address any session
            ("sessionid=nope&token=tok", {}, 404, ErrorCode.UNKNOWN_SESSION),
        ):
            async with h.client.get(f"/events?{query}", headers=headers) as resp:
                assert resp.status == status, (query, await resp.text())
                if status != 200:
                    assert (await resp.json())["code"] == code
    async with running_server(tmp_path) as h:
        viewer = await h.viewer()
        sid = viewer.session.id
        async with h.client.get(f"/events?sessionid={sid}") as resp:
            assert resp.status == 200  # the default session's own id needs no secret
        other = await h.viewer()
        async with h.client.get(f"/events?sessionid={other.session.id}") as resp:
            assert resp.status == 403 and (await resp.json())["code"] == ErrorCode.FORBIDDEN
        sse = await open_events(h, "sessionid=0")  # the default session
        assert viewer.session.say("Default.")
        assert (await sse.until(lambda e: e.kind == "queued")).data["sessionid"] == sid
        await sse.close()
        async with h.client.get(f"/events?sessionid={other.session.id}", headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403


@pytest.mark.slow
async def test_speaking_started_arrives_within_100_ms_of_the_first_speaking_frame(server: ServerProcess) -> None:
    """Over real WebRTC: the first speech packet and the first speaking video frame at the
    client, against the arrival of ``speaking_started`` on ``GET /events``; the same for
    ``speaking_ended`` and the last ones."""
    async with AvatarClient(server.url, keep_images=False, tap_packets=True) as client:
        await client.connect()
        sse = await client.sse()
        await asyncio.sleep(0.5)
        differences: list[tuple[float, float, float, float]] = []
        before = 0.0  # the previous utterance's last speech packet
        for text in ("Hello there, how are you today?", "One more sentence for the record.", "And a third one."):
            await client.say(text)
            started = await sse.until(lambda e, t=text: e.kind == "speaking_started" and e.data.get("text") == t)
            ended = await sse.until(lambda e, u=started.data["utterance"]: e.kind == "speaking_ended" and e.data["utterance"] == u,
                                    timeout=20)
            await asyncio.sleep(0.5)
            loud = [p for p in client.received.audio_packets if p.rms > 0.01 and p.t > before]
            assert loud, "no speech reached the client"
            first_audio, last_audio = loud[0], loud[-1]
            before = last_audio.t
            # the video frame showing the same media frame as the first speech packet
            index = first_audio.pts // int(48_000 * FRAME_S)
            frames = [v for v in client.received.video_packets if round(v.pts / VIDEO_TICKS_PER_FRAME) >= index]
            decoded = [v for v in client.received.video if round(v.pts / VIDEO_TICKS_PER_FRAME) >= index]
            assert frames and decoded
            differences.append((started.t - first_audio.t, started.t - frames[0].t, ended.t - last_audio.t,
                                started.t - decoded[0].t))
        await sse.close()
    for d in differences:
        log.info("speaking_started - first speech packet %.1f ms, - first speaking video frame on the wire %.1f ms, "
                 "- decoded %.1f ms; speaking_ended - last speech packet %.1f ms", d[0] * 1000, d[1] * 1000, d[3] * 1000,
                 d[2] * 1000)
    started_audio = np.array([d[0] for d in differences])
    started_video = np.array([d[1] for d in differences])
    assert np.abs(started_audio).max() < 0.1, f"speaking_started vs first speech packet: {started_audio * 1000} ms"
    assert np.abs(started_video).max() < 0.1, f"speaking_started vs first speaking frame: {started_video * 1000} ms"
    decoded = np.array([d[3] for d in differences])  # aiortc holds a frame until the next one starts: 40 ms more
    assert np.abs(decoded).max() < 0.15, f"speaking_started vs first speaking frame decoded: {decoded * 1000} ms"
    assert np.abs(np.array([d[2] for d in differences])).max() < 0.15
