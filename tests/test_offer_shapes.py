"""Offers of any shape get an answer that streams what they asked for, and a client that
sends its own microphone and camera costs the server nothing that grows. Real server,
real aiortc peers."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack, VideoStreamTrack

from tests.support.server_process import ServerProcess

pytestmark = pytest.mark.slow


async def offer(server: ServerProcess, pc: RTCPeerConnection) -> tuple[int, dict[str, object]]:
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http, http.post(
        server.url + "/offer", json={"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
    ) as resp:
        body = await resp.json()
    if resp.status == 200:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
    return resp.status, body


def sections(sdp: str) -> list[str]:
    return [line.split()[0].removeprefix("m=") for line in sdp.splitlines() if line.startswith("m=")]


async def count_frames(track: MediaStreamTrack, seconds: float) -> int:
    n = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(MediaStreamError, asyncio.TimeoutError):
        while time.monotonic() < deadline:
            await asyncio.wait_for(track.recv(), seconds)
            n += 1
    return n


@contextlib.asynccontextmanager
async def peer() -> AsyncIterator[RTCPeerConnection]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        yield pc
    finally:
        await pc.close()


@pytest.mark.parametrize("kind", ["video", "audio"])
async def test_a_one_kind_offer_is_answered_and_streams_that_kind(server: ServerProcess, kind: str) -> None:
    async with peer() as pc:
        got: list[MediaStreamTrack] = []
        pc.on("track", got.append)
        pc.addTransceiver(kind, direction="recvonly")
        status, body = await offer(server, pc)
        assert status == 200, body
        assert sections(str(body["sdp"])) == [kind]
        assert got and got[0].kind == kind
        frames = await count_frames(got[0], 1.5)
        assert frames >= (25 if kind == "video" else 50)  # 25 video frames / 50 audio frames a second


async def test_a_data_channel_only_offer_is_answered(server: ServerProcess) -> None:
    async with peer() as pc:
        pc.createDataChannel("chat")
        status, body = await offer(server, pc)
        assert status == 200 and sections(str(body["sdp"])) == ["application"], body


async def test_a_sendrecv_offer_gets_the_avatar_and_is_asked_to_keep_its_media(server: ServerProcess) -> None:
    async with peer() as pc:
        got: list[MediaStreamTrack] = []
        pc.on("track", got.append)
        pc.addTrack(AudioStreamTrack())  # a microphone
        pc.addTrack(VideoStreamTrack())  # a camera
        status, body = await offer(server, pc)
        assert status == 200, body
        sdp = str(body["sdp"])
        assert sections(sdp) == ["audio", "video"] and sdp.count("a=sendonly") == 2
        assert {t.kind for t in got} == {"audio", "video"}
        video = next(t for t in got if t.kind == "video")
        assert await count_frames(video, 1.0) >= 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def test_a_client_sending_microphone_and_camera_for_a_minute_leaves_server_memory_flat(server: ServerProcess) -> None:
    async with peer() as pc:
        got: list[MediaStreamTrack] = []
        pc.on("track", got.append)
        pc.addTrack(AudioStreamTrack())
        pc.addTrack(VideoStreamTrack())
        status, body = await offer(server, pc)
        assert status == 200, body
        video = next(t for t in got if t.kind == "video")
        await count_frames(video, 5.0)  # settled: encoders and buffers allocated
        before = rss_mb(server.proc.pid)
        frames = await count_frames(video, 60.0)
        grown = rss_mb(server.proc.pid) - before
        assert frames >= 60 * 20, f"only {frames} video frames in 60 s"
        assert grown < 30, f"the server grew by {grown:.1f} MB in 60 s"


VANISHING_CLIENT = """
import asyncio, sys
from tests.support.client import AvatarClient
async def main():
    client = AvatarClient(sys.argv[1], keep_images=False)
    await client.connect()
    print("connected", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_client_that_vanishes_is_freed_within_seconds(server: ServerProcess) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(  # noqa: ASYNC220 - a client of its own, killed below; its start is quick
        [sys.executable, "-c", VANISHING_CLIENT, server.url], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        before = server.stats()["sessions"]
        proc.kill()  # no goodbye: a closed laptop lid, a dead network
        started = time.monotonic()
        while server.stats()["sessions"] >= before and time.monotonic() - started < 25:
            await asyncio.sleep(0.5)
        freed = time.monotonic() - started
        assert server.stats()["sessions"] == before - 1 and freed < 15, f"freed after {freed:.1f} s"
    finally:
        proc.kill()
        proc.wait()


async def test_a_data_channel_only_session_is_not_taken_for_a_vanished_peer(server: ServerProcess) -> None:
    async with peer() as pc:
        channel = pc.createDataChannel("chat")
        status, body = await offer(server, pc)
        assert status == 200
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await asyncio.wait_for(opened.wait(), 10)
        await asyncio.sleep(12)  # longer than the silence a media peer is allowed
        async with aiohttp.ClientSession() as http, http.post(
            server.url + "/is_speaking", json={"sessionid": body["sessionid"], "secret": body["secret"]}
        ) as resp:
            assert resp.status == 200  # still open
