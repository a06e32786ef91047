"""``LipSyncVideoService``: a Real-Time Lip Sync server as the face of a pipecat voice agent.

The service sits after the TTS service. It sends the TTS audio to the server's streamed
audio route (``/audio_stream``), receives the avatar's WebRTC stream and pushes its video
and its audio downstream, so the bot's transport plays the mouth and the voice together.

It talks to the server over HTTP, WebSocket and WebRTC only, so a bot installs it beside
pipecat without any of the server's dependencies.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av.audio.frame import AudioFrame
from av.audio.resampler import AudioResampler
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

try:  # pipecat 1.x; before it the same frame was StartInterruptionFrame
    from pipecat.frames.frames import InterruptionFrame as _Interruption
except ImportError:  # pragma: no cover - older pipecat
    from pipecat.frames.frames import StartInterruptionFrame as _Interruption  # type: ignore[attr-defined,no-redef]

# A decoded frame whose peak is below this is silence: the server sends digital silence
# between segments, which Opus brings back as zeros or a few LSBs of noise.
SILENCE_PEAK = 64
# Outside a segment (speech the server produced from text, or events that never came) the
# voice is taken to have ended after this much silence.
HANGOVER_S = 0.3
# After our own interruption, what the server had already sent is dropped until it
# confirms the stop (playback_finished) or this long at most.
MUTE_AFTER_CLEAR_S = 0.5
# What WebRTC still holds once the server has stopped: the network and aiortc's receive buffer.
IN_FLIGHT_S = 0.1
# Silence that ends the voice once the server's playback_finished has come.
FINISHED_TAIL_S = 0.04


class LipSyncVideoService(AIService):
    """Sends the pipeline's TTS audio to a Real-Time Lip Sync server and pushes the avatar's
    video (``OutputImageRawFrame``, RGB) and voice (``TTSAudioRawFrame``) downstream.

    Event handlers: ``on_playback_started(service, segment)`` and
    ``on_playback_finished(service, segment, playback_position, interrupted)``, from the
    server's events on the audio stream.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        avatar: str | None = None,
        session: aiohttp.ClientSession | None = None,
        ice_servers: list[str] | None = None,
        connect_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        """Args:
        base_url: the server, e.g. ``http://localhost:8010``.
        token: the server's operator token (``--token``), when it has one.
        avatar: an avatar name from ``GET /avatars``; the server's default otherwise.
        session: an aiohttp session to use; one of our own (closed by us) otherwise.
        ice_servers: STUN/TURN URLs for reaching a server behind NAT; none (host
            candidates only) by default, which is right on a LAN or the same machine.
        connect_timeout: how long opening the session may take.
        """
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._avatar = avatar
        self._http = session
        self._own_http = session is None
        self._ice_servers = ice_servers or []
        self._connect_timeout = connect_timeout

        self._pc: RTCPeerConnection | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task] = []
        self.session_id: str | None = None
        self.secret: str | None = None

        self._out_rate = 24000  # the pipeline's output rate, from setup()
        self._sent_format: tuple[int, int] | None = None
        self._context_id: str | None = None
        self._warned_no_ws = False

        # the gate on the avatar's audio: only speech goes downstream, so the transport's
        # "bot speaking" follows the avatar and idle silence is not played as bot audio
        self._resampler: AudioResampler | None = None
        self._segment_open = False
        self._segment_finished = False
        self._pushing = False
        self._silent_run = 0.0
        self._muted_until = 0.0

        self._register_event_handler("on_playback_started")
        self._register_event_handler("on_playback_finished")

    # ---- lifecycle ----

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._out_rate = setup.audio_out_sample_rate
        # connecting here (pipecat sets processors up concurrently and holds the StartFrame
        # until this returns) means the session exists once the StartFrame passes
        try:
            await asyncio.wait_for(self._connect(), self._connect_timeout)
        except Exception as e:
            await self.push_error(error_msg=f"Real-Time Lip Sync: cannot open a session at {self._base_url}: {e}", exception=e)

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._disconnect()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._disconnect()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._disconnect()

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def _connect(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        config = RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in self._ice_servers])
        pc = self._pc = RTCPeerConnection(config)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")

        @pc.on("track")
        def on_track(track: Any) -> None:
            reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
            self._tasks.append(self.create_task(reader, f"lipsync-{track.kind}"))

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers candidates here
        body: dict[str, Any] = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        if self._avatar:
            body["avatar"] = self._avatar
        async with self._http.post(f"{self._base_url}/offer", json=body, headers=self._auth) as resp:
            answer = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"/offer answered {resp.status}: {answer.get('msg', answer)}")
        self.session_id = str(answer["sessionid"])
        self.secret = answer.get("secret")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        logger.info(f"{self}: session {self.session_id} on {self._base_url}")

        params = {"sessionid": self.session_id}
        if self.secret:
            params["secret"] = self.secret
        self._ws = await self._http.ws_connect(f"{self._base_url}/audio_stream", params=params, headers=self._auth, heartbeat=20)
        self._sent_format = None
        self._tasks.append(self.create_task(self._read_events(self._ws), "lipsync-events"))

    async def _disconnect(self) -> None:
        # idempotent: stop(), cancel() and cleanup() all come here
        tasks, self._tasks = self._tasks, []
        ws, self._ws = self._ws, None
        pc, self._pc = self._pc, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()
        for task in tasks:
            await self.cancel_task(task)
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None
        if pc is not None:
            logger.info(f"{self}: session {self.session_id} closed")

    # ---- pipeline → server ----

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            # the TTS voice is replaced by the avatar's, which comes back in step with the mouth
            self._context_id = frame.context_id or self._context_id
            await self._send_audio(frame)
            return
        if isinstance(frame, TTSStartedFrame):
            self._context_id = getattr(frame, "context_id", None) or self._context_id
        elif isinstance(frame, TTSStoppedFrame):
            await self._send_json({"type": "end_of_segment"})
        elif isinstance(frame, _Interruption):
            await self._clear()
        await self.push_frame(frame, direction)

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        fmt = (frame.sample_rate, frame.num_channels)
        if fmt != self._sent_format:
            if not await self._send_json({"type": "format", "sample_rate": fmt[0], "channels": fmt[1]}):
                return
            self._sent_format = fmt
        ws = self._ws
        if ws is None or ws.closed:
            self._warn_no_ws()
            return
        try:
            await ws.send_bytes(frame.audio)
        except (ConnectionError, RuntimeError) as e:
            logger.warning(f"{self}: audio not sent: {e}")

    async def _send_json(self, message: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            self._warn_no_ws()
            return False
        try:
            await ws.send_str(json.dumps(message))
            return True
        except (ConnectionError, RuntimeError) as e:
            logger.warning(f"{self}: {message.get('type')} not sent: {e}")
            return False

    def _warn_no_ws(self) -> None:
        if not self._warned_no_ws:
            self._warned_no_ws = True
            logger.warning(f"{self}: no audio stream to {self._base_url}; TTS audio is dropped")

    async def _clear(self) -> None:
        """An interruption: the server drops what it holds, and we what it already sent."""
        await self._send_json({"type": "clear_buffer"})
        self._stop_pushing()
        self._muted_until = time.monotonic() + MUTE_AFTER_CLEAR_S

    # ---- server → pipeline ----

    async def _read_events(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                logger.warning(f"{self}: not JSON from the server: {msg.data[:200]!r}")
                continue
            kind = event.get("event")
            if kind == "playback_started":
                logger.debug(f"{self}: playback_started {event.get('segment')}")
                self._segment_open = True
                self._segment_finished = False
                await self._call_event_handler("on_playback_started", event.get("segment"))
            elif kind == "playback_finished":
                interrupted = bool(event.get("interrupted"))
                logger.debug(f"{self}: playback_finished {event}")
                self._segment_open = False
                self._segment_finished = True
                if interrupted:
                    # stopped on the server (our clear_buffer, or another client): what is still
                    # in the receive buffer was cut off there too, so it is not played here
                    self._stop_pushing()
                    self._muted_until = time.monotonic() + IN_FLIGHT_S
                await self._call_event_handler(
                    "on_playback_finished", event.get("segment"), event.get("playback_position"), interrupted
                )
            elif kind == "closed":
                logger.info(f"{self}: the server ended session {self.session_id}")
            elif kind == "error":
                logger.warning(f"{self}: server error {event.get('code')}: {event.get('msg')}")
                await self.push_error(error_msg=f"Real-Time Lip Sync server: {event.get('msg')} ({event.get('code')})")
            else:
                logger.debug(f"{self}: event {event}")
        if self._ws is ws:  # not our own close
            logger.warning(f"{self}: the server closed the audio stream ({ws.close_code})")

    async def _read_video(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                image = frame.to_ndarray(format="rgb24")
                await self.push_frame(OutputImageRawFrame(image=image.tobytes(), size=(frame.width, frame.height), format="RGB"))
        except MediaStreamError:
            logger.debug(f"{self}: video track ended")

    async def _read_audio(self, track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                await self._on_audio(frame)
        except MediaStreamError:
            logger.debug(f"{self}: audio track ended")

    async def _on_audio(self, frame: AudioFrame) -> None:
        """One decoded frame (20 ms) of the avatar's voice: pushed as it arrives, which is the
        avatar's own timing, while the avatar speaks; dropped while it is idle."""
        now = time.monotonic()
        if self._muted_until:
            if now < self._muted_until:
                return
            self._muted_until = 0.0
        pcm = frame.to_ndarray()
        loud = pcm.size > 0 and int(np.abs(pcm.astype(np.int32)).max()) > SILENCE_PEAK
        if not self._pushing:
            if not loud:
                return
            self._pushing = True
            self._silent_run = 0.0
        if self._resampler is None:
            self._resampler = AudioResampler(format="s16", layout="mono", rate=self._out_rate)
        for out in self._resampler.resample(frame):
            audio = out.to_ndarray().tobytes()
            if audio:
                out_frame = TTSAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1, context_id=self._context_id)
                await self.push_frame(out_frame)
        # the end: silence once the server has said the segment finished (its event comes a
        # little before the last audio, which waits in the receive buffer), or a pause longer
        # than HANGOVER_S outside any segment; pauses inside a segment are kept, so it is whole
        self._silent_run = 0.0 if loud else self._silent_run + frame.samples / frame.sample_rate
        if not self._segment_open and self._silent_run >= (FINISHED_TAIL_S if self._segment_finished else HANGOVER_S):
            self._stop_pushing()

    def _stop_pushing(self) -> None:
        self._pushing = False
        self._segment_finished = False
        self._silent_run = 0.0
        self._resampler = None  # what it holds belongs to the audio just dropped or ended
