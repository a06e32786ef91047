"""The WebRTC side of a session: an aiortc peer connection that sends the session's two
tracks, answers the client's offer, and closes the session when the peer goes away or
never connects."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from server.session import Session
from server.tracks import AvatarAudioTrack, AvatarVideoTrack

log = logging.getLogger(__name__)


async def answer_offer(
    session: Session,
    offer: RTCSessionDescription,
    ice_servers: list[str],
    connect_timeout_s: float,
    on_gone: Callable[[str], None],
) -> RTCSessionDescription:
    """Attach a peer connection to ``session`` and answer ``offer`` (ValueError and
    friends from aiortc when the offer cannot be answered)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))
    session.pc = pc
    pc.addTrack(AvatarAudioTrack(session.player))
    pc.addTrack(AvatarVideoTrack(session.player))

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        log.info("session %s: peer %s", session.id, pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            on_gone(session.id)

    async def close_if_never_connected() -> None:
        await asyncio.sleep(connect_timeout_s)
        if not session.closed and pc.connectionState != "connected":
            log.info("session %s: peer never connected; closing", session.id)
            on_gone(session.id)

    session.keep(asyncio.ensure_future(close_if_never_connected()))
    await pc.setRemoteDescription(offer)
    await pc.setLocalDescription(await pc.createAnswer())
    local = pc.localDescription
    return RTCSessionDescription(sdp=local.sdp, type=local.type)
