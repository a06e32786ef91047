"""The WebRTC side of a session: an aiortc peer connection that answers the client's
offer, whatever its shape, sends the session's tracks for the kinds the offer asked for,
and closes the session when the peer goes away or never connects.

The offer is read first and tracks are added after, only for its audio and video
sections (video-only, audio-only, data-channel-only, recvonly or sendrecv all get an
answer). We only send: a client's own microphone or camera (pipecat's small WebRTC
client sends its microphone by default) is asked not to be sent (our side answers
``sendonly``), and whatever arrives anyway is consumed and dropped, so it costs nothing
that grows.

The same answering and watching serve a session's viewers (``server.viewers``): only
what happens when the peer goes differs (a viewer's end closes the viewer, not the session).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole
from aiortc.mediastreams import MediaStreamTrack

from server.tracks import AvatarAudioTrack, AvatarVideoTrack

if TYPE_CHECKING:  # the session holds its viewers, which answer through here
    from server.session import Session

log = logging.getLogger(__name__)

WATCH_EVERY_S = 2.0
# A receiving peer reports on our streams (RTCP receiver reports) about every second; this
# long without one it is gone (closed tab, dead network). ICE consent would take 30 s.
PEER_SILENCE_S = 8.0


def new_peer(ice_servers: list[str]) -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in ice_servers]))


async def close_if_peer_vanishes(pc: RTCPeerConnection, label: str, alive: Callable[[], bool], gone: Callable[[], None]) -> None:
    """Call ``gone`` when ``pc``'s peer stops answering without saying goodbye."""
    last_heard: datetime | None = None
    while alive():
        await asyncio.sleep(WATCH_EVERY_S)
        if pc.connectionState != "connected":
            continue
        senders = [t.sender for t in pc.getTransceivers() if t.sender.track is not None]
        if not senders:
            return  # nothing we send, nothing reported on: ICE consent is the only sign (30 s)
        now = datetime.now(timezone.utc)
        for sender in senders:
            for stat in (await sender.getStats()).values():
                if stat.type == "remote-inbound-rtp" and (last_heard is None or stat.timestamp > last_heard):
                    last_heard = stat.timestamp
        if last_heard is None:
            last_heard = now  # connected, no report yet: count from here
        elif (now - last_heard).total_seconds() > PEER_SILENCE_S:
            log.info("%s: no word from the peer for %.0f s; closing", label, (now - last_heard).total_seconds())
            gone()
            return


async def close_if_never_connected(
    pc: RTCPeerConnection, label: str, timeout_s: float, alive: Callable[[], bool], gone: Callable[[], None]
) -> None:
    await asyncio.sleep(timeout_s)
    if alive() and pc.connectionState != "connected":
        log.info("%s: peer never connected; closing", label)
        gone()


async def answer(
    pc: RTCPeerConnection,
    offer: RTCSessionDescription,
    tracks: dict[str, MediaStreamTrack],
    inbound: MediaBlackhole,
    label: str,
    gone: Callable[[], None],
) -> RTCSessionDescription:
    """Answer ``offer`` on ``pc``, sending ``tracks`` (by kind) where the offer has a section
    for them; what the client sends goes to ``inbound``; ``gone`` when the peer fails or
    closes. ValueError and friends from aiortc when the offer cannot be answered."""

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        log.info("%s: the client sends %s; it is dropped", label, track.kind)
        inbound.addTrack(track)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        log.info("%s: peer %s", label, pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            gone()

    await pc.setRemoteDescription(offer)
    if not pc.getTransceivers() and pc.sctp is None:
        raise ValueError("it has no audio, video or data channel section (is it an SDP offer?)")
    for transceiver in pc.getTransceivers():
        track = tracks.pop(transceiver.kind, None)
        if track is not None:
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendonly"  # we send; the client's own media is not asked for
        else:  # a second section of a kind already served: nothing to send there
            transceiver.direction = "inactive"
    await inbound.start()
    await pc.setLocalDescription(await pc.createAnswer())
    local = pc.localDescription
    return RTCSessionDescription(sdp=local.sdp, type=local.type)


async def answer_offer(
    session: Session,
    offer: RTCSessionDescription,
    ice_servers: list[str],
    connect_timeout_s: float,
    on_gone: Callable[[str], None],
) -> RTCSessionDescription:
    """Attach a peer connection to ``session`` and answer ``offer`` (ValueError and
    friends from aiortc when the offer cannot be answered)."""
    pc = new_peer(ice_servers)
    session.pc = pc
    inbound = MediaBlackhole()
    session.inbound = inbound
    label = f"session {session.id}"

    def alive() -> bool:
        return not session.closed

    def gone() -> None:
        on_gone(session.id)

    session.keep(asyncio.ensure_future(close_if_never_connected(pc, label, connect_timeout_s, alive, gone)))
    session.keep(asyncio.ensure_future(close_if_peer_vanishes(pc, label, alive, gone)))
    tracks: dict[str, MediaStreamTrack] = {"audio": AvatarAudioTrack(session.player), "video": AvatarVideoTrack(session.player)}
    return await answer(pc, offer, tracks, inbound, label, gone)
