"""Sessions: one per WebRTC peer. Each owns a frame ring, a player, a speech queue and
the listeners of its events; the manager routes worker messages to them and makes sure
everything a session held is released when it ends."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection

from avatars.avatar import Avatar
from pipeline.client import WorkerClient
from pipeline.frame_ring import FrameRing
from pipeline.messages import (
    SAMPLE_RATE,
    AudioChunk,
    CloseSession,
    ForgetAvatar,
    FrameReady,
    GenerateVideo,
    Interrupt,
    JobDone,
    OpenSession,
    SessionOpened,
    WorkerError,
    WorkerStats,
)
from server.config import ServerConfig
from server.errors import ApiError, ErrorCode
from server.media import AvatarAudioTrack, AvatarVideoTrack, SessionPlayer
from server.recorder import Recorder
from tts.base import TTSBackend, TTSError

log = logging.getLogger(__name__)

START_LEAD_FRAMES = 2  # frames between sending speech and its first frame being shown
CHUNK_SAMPLES = SAMPLE_RATE  # uploaded audio goes to the worker a second at a time
OPEN_TIMEOUT_S = 120.0


@dataclass
class Utterance:
    id: str
    generation: int
    text: str | None = None
    pcm: np.ndarray | None = None  # int16 16 kHz, for uploaded audio
    samples_sent: int = 0
    state: str = "queued"  # queued -> speaking -> ended
    queued_at: float = field(default_factory=time.monotonic)


class Session:
    def __init__(self, session_id: str, avatar: Avatar, ring: FrameRing, manager: "SessionManager") -> None:
        self.id = session_id
        self.avatar = avatar
        self.ring = ring
        self.manager = manager
        self.generation = 0
        self.player = SessionPlayer(avatar, ring, on_event=self._on_player_event, idle_yuv=manager.idle_yuv(avatar.name))
        self.pc: RTCPeerConnection | None = None
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.recorder: Recorder | None = None
        self.last_recording: Path | None = None
        self.created_at = time.monotonic()
        self.audiotype = 0
        self.closed = False
        self._utterances: dict[str, Utterance] = {}
        self._queue: asyncio.Queue[Utterance] = asyncio.Queue()
        self._subscribers: set[asyncio.Queue] = set()
        self._speech_task: asyncio.Task | None = asyncio.ensure_future(self._speech_loop())
        self._counter = 0

    # ---- events ----
    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)

    def publish(self, event: str, **data: Any) -> None:
        message = {"event": event, "sessionid": self.id, "t": round(time.time(), 3), **data}
        for q in list(self._subscribers):
            if q.full():  # a listener that stopped reading loses old events, not the session
                q.get_nowait()
            q.put_nowait(message)

    # ---- speech ----
    @property
    def is_speaking(self) -> bool:
        return bool(self._utterances)

    def _new_utterance(self, text: str | None = None, pcm: np.ndarray | None = None) -> Utterance:
        self._counter += 1
        utt = Utterance(f"{self.id}-{self._counter}", self.generation, text=text, pcm=pcm)
        self._utterances[utt.id] = utt
        self._queue.put_nowait(utt)
        self.publish("queued", utterance=utt.id, text=text, source="text" if text is not None else "audio")
        return utt

    def say(self, text: str, interrupt: bool = False) -> Utterance:
        if interrupt:
            self.interrupt()
        return self._new_utterance(text=text)

    def play_audio(self, pcm: np.ndarray, interrupt: bool = False) -> Utterance:
        if interrupt:
            self.interrupt()
        return self._new_utterance(pcm=pcm)

    def interrupt(self) -> list[str]:
        """Stop speaking now: every stage drops this session's speech (queued text, TTS in
        progress, PCM and features in the worker, frames rendered but not shown)."""
        self.generation += 1
        if self._speech_task is not None:
            self._speech_task.cancel()
        self._queue = asyncio.Queue()
        self.manager.worker.send(Interrupt(self.id, self.generation))
        self.player.interrupt(self.generation)
        cut = list(self._utterances)
        self._utterances.clear()
        for utt_id in cut:
            self.publish("speaking_ended", utterance=utt_id, interrupted=True)
        if not self.closed:
            self._speech_task = asyncio.ensure_future(self._speech_loop())
        return cut

    def _end(self, utt_id: str, **extra: Any) -> None:
        if self._utterances.pop(utt_id, None) is not None:
            self.publish("speaking_ended", utterance=utt_id, **extra)

    def _on_player_event(self, kind: str, utt_id: str) -> None:
        utt = self._utterances.get(utt_id)
        if utt is None:
            return
        if kind == "started" and utt.state == "queued":
            utt.state = "speaking"
            self.publish("speaking_started", utterance=utt_id, latency_ms=round((time.monotonic() - utt.queued_at) * 1000, 1))
        elif kind == "ended":
            self._end(utt_id)

    async def _pcm_source(self, utt: Utterance) -> AsyncIterator[np.ndarray]:
        if utt.text is not None:
            async for chunk in self.manager.tts.stream(utt.text):
                yield np.clip(chunk * 32768.0, -32768, 32767).astype(np.int16)
        else:
            assert utt.pcm is not None
            for start in range(0, utt.pcm.size, CHUNK_SAMPLES):
                yield utt.pcm[start : start + CHUNK_SAMPLES]

    async def _speech_loop(self) -> None:
        queue = self._queue
        while True:
            utt = await queue.get()
            if utt.generation != self.generation or utt.id not in self._utterances:
                continue
            try:
                async for pcm in self._pcm_source(utt):
                    if pcm.size == 0:
                        continue
                    first = utt.samples_sent == 0
                    self.manager.worker.send(
                        AudioChunk(
                            self.id,
                            self.generation,
                            utt.id,
                            pcm.tobytes(),
                            start_cursor=self.player.cursor + START_LEAD_FRAMES if first else 0,
                        )
                    )
                    utt.samples_sent += pcm.size
                if utt.samples_sent == 0:
                    self._end(utt.id, empty=True)
                    continue
                self.manager.worker.send(AudioChunk(self.id, self.generation, utt.id, b"", final=True))
            except TTSError as exc:
                log.warning("session %s: TTS failed: %s", self.id, exc)
                self.publish("error", code=int(ErrorCode.TTS_FAILED), msg=str(exc), utterance=utt.id)
                if utt.samples_sent:
                    self.manager.worker.send(AudioChunk(self.id, self.generation, utt.id, b"", final=True))
                else:
                    self._end(utt.id, error=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("session %s: speech failed", self.id)
                self.publish("error", code=int(ErrorCode.INTERNAL), msg=f"speech failed: {exc}", utterance=utt.id)
                self._end(utt.id, error=True)

    # ---- worker ----
    def on_worker_error(self, msg: WorkerError) -> None:
        self.publish("error", code=int(ErrorCode.WORKER_UNAVAILABLE), msg=msg.message)
        self.interrupt()

    def on_worker_lost(self) -> None:
        """The worker died: what it held for us is gone; show idle until it is back."""
        self.generation += 1
        self.player.interrupt(self.generation)
        self.ring.reset()
        for utt_id in list(self._utterances):
            self.publish("error", code=int(ErrorCode.WORKER_UNAVAILABLE), msg="the inference worker restarted; speech was cut off", utterance=utt_id)
            self._end(utt_id, interrupted=True)
        if self._speech_task is not None:
            self._speech_task.cancel()
        self._queue = asyncio.Queue()
        if not self.closed:
            self._speech_task = asyncio.ensure_future(self._speech_loop())

    # ---- recording ----
    def start_record(self, path: Path) -> None:
        if self.recorder is not None:
            raise ApiError(409, ErrorCode.CONFLICT, "this session is already recording; send end_record first")
        self.recorder = Recorder(path, self.avatar.width, self.avatar.height)
        self.player.on_frame = self.recorder.add

    async def end_record(self) -> Path:
        if self.recorder is None:
            raise ApiError(409, ErrorCode.CONFLICT, "this session is not recording; send start_record first")
        recorder, self.recorder = self.recorder, None
        self.player.on_frame = None
        path = await asyncio.get_running_loop().run_in_executor(None, recorder.finish)
        self.last_recording = path
        return path

    # ---- teardown ----
    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._speech_task is not None:
            self._speech_task.cancel()
        for utt_id in list(self._utterances):
            self._end(utt_id, interrupted=True)
        self.publish("closed")
        self.player.close()
        if self.recorder is not None:
            try:
                await self.end_record()
            except Exception:
                log.exception("session %s: finishing the recording failed", self.id)
        if self.pc is not None:
            await self.pc.close()
        self.ring.close()


class SessionManager:
    def __init__(self, config: ServerConfig, tts: TTSBackend) -> None:
        self.config = config
        self.tts = tts
        self.sessions: dict[str, Session] = {}
        self.avatars: dict[str, Avatar] = {}
        self.worker: WorkerClient = None  # type: ignore[assignment]  # set by attach_worker
        self.worker_stats: WorkerStats | None = None
        self._idle_yuv: dict[str, dict[int, np.ndarray | None]] = {}
        self.video_frames_skipped = 0  # by sessions already closed
        self._jobs: dict[str, asyncio.Future] = {}

    def idle_yuv(self, avatar_name: str) -> dict[int, np.ndarray | None]:
        return self._idle_yuv.setdefault(avatar_name, {})

    def forget_avatar(self, avatar_name: str) -> None:
        """The avatar was prepared again: drop what was cached from the old frames."""
        self._idle_yuv.pop(avatar_name, None)
        if self.worker is not None:
            self.worker.send(ForgetAvatar(avatar_name))

    async def generate_video(self, avatar: str, audio_path: Path, out_path: Path) -> dict[str, Any]:
        """An offline mp4 rendered by the worker, with the engine and weights it already
        holds, in the gaps between live sessions' batches."""
        if self.worker is None or not self.worker.alive:
            raise ApiError(503, ErrorCode.WORKER_UNAVAILABLE, "the inference worker is not running; try again in a moment")
        job_id = secrets.token_hex(8)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._jobs[job_id] = future
        self.worker.send(GenerateVideo(job_id, avatar, str(audio_path), str(out_path)))
        try:
            done: JobDone = await future
        finally:
            self._jobs.pop(job_id, None)
        if not done.ok:
            raise ApiError(400, ErrorCode.UNSUPPORTED_AUDIO, f"could not render {audio_path.name}: {done.error}")
        return done.result

    def attach_worker(self, worker: WorkerClient) -> None:
        self.worker = worker

    def get(self, session_id: str | None) -> Session:
        session = self.sessions.get(session_id or "")
        if session is None:
            raise ApiError(404, ErrorCode.UNKNOWN_SESSION, f"unknown session {session_id!r}: open one with POST /offer")
        return session

    async def create(self, avatar: Avatar) -> Session:
        if len(self.sessions) >= self.config.max_sessions:
            raise ApiError(
                503, ErrorCode.TOO_MANY_SESSIONS,
                f"the server is at its limit of {self.config.max_sessions} sessions; try again later or raise --max-sessions",
            )
        if self.worker is None or not self.worker.alive:
            raise ApiError(503, ErrorCode.WORKER_UNAVAILABLE, "the inference worker is not running; try again in a moment")
        session_id = secrets.token_hex(8)
        ring = FrameRing.create(self.config.ring_slots, avatar.frame_shape, tag=session_id)
        session = Session(session_id, avatar, ring, self)
        self.sessions[session_id] = session
        self.worker.send(OpenSession(session_id, avatar.name, ring.name, ring.slots, avatar.frame_shape))
        try:
            result: SessionOpened = await asyncio.wait_for(asyncio.shield(session.opened), OPEN_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.close(session_id)
            raise ApiError(503, ErrorCode.WORKER_UNAVAILABLE, "the inference worker did not open the session in time") from None
        if not result.ok:
            await self.close(session_id)
            raise ApiError(503, ErrorCode.WORKER_UNAVAILABLE, f"the inference worker could not open the session: {result.error}")
        return session

    def attach_peer(self, session: Session, pc: RTCPeerConnection) -> None:
        session.pc = pc
        pc.addTrack(AvatarAudioTrack(session.player))
        pc.addTrack(AvatarVideoTrack(session.player))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: peer %s", session.id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.id)

        asyncio.ensure_future(self._close_if_never_connected(session))

    async def _close_if_never_connected(self, session: Session) -> None:
        await asyncio.sleep(self.config.connect_timeout_s)
        if not session.closed and session.pc is not None and session.pc.connectionState != "connected":
            log.info("session %s: peer never connected; closing", session.id)
            await self.close(session.id)

    async def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        self.video_frames_skipped += session.player.video_frames_skipped
        if self.worker is not None:
            self.worker.send(CloseSession(session_id))
        await session.close()
        log.info("session %s closed (%d open)", session_id, len(self.sessions))

    async def close_all(self) -> None:
        for session_id in list(self.sessions):
            await self.close(session_id)

    # ---- worker messages ----
    def on_worker_message(self, msg: Any) -> None:
        if isinstance(msg, FrameReady):
            session = self.sessions.get(msg.session_id)
            if session is not None:
                session.player.push(msg)
            # else: the session is gone and its ring unlinked with it
        elif isinstance(msg, SessionOpened):
            session = self.sessions.get(msg.session_id)
            if session is not None and not session.opened.done():
                session.opened.set_result(msg)
        elif isinstance(msg, WorkerError):
            session = self.sessions.get(msg.session_id)
            if session is not None:
                session.on_worker_error(msg)
            else:
                log.error("worker: %s", msg.message)
        elif isinstance(msg, JobDone):
            future = self._jobs.get(msg.job_id)
            if future is not None and not future.done():
                future.set_result(msg)
        elif isinstance(msg, WorkerStats):
            self.worker_stats = msg

    async def on_worker_restart(self) -> None:
        for job_id, future in list(self._jobs.items()):
            if not future.done():
                future.set_result(JobDone(job_id, ok=False, error="the inference worker restarted during the job; send it again"))
        for session in list(self.sessions.values()):
            session.on_worker_lost()
            self.worker.send(
                OpenSession(session.id, session.avatar.name, session.ring.name, session.ring.slots, session.avatar.frame_shape)
            )
