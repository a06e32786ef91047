"""The sessions of one server, and its one inference worker.

The manager opens and closes sessions, owns every shared-memory ring it hands the worker
(so a crash leaks nothing), routes what the worker sends back to the session it is for,
and re-opens every session on a new worker after a restart. It builds its worker itself,
from a factory, and is that worker's handler: nothing is wired after construction.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import RTCSessionDescription

from avatars.avatar import Avatar, AvatarNotFound, InvalidAvatarName, check_name, load_avatar
from avatars.frame_store import SharedFrames
from media.decode import AudioDecodeError, decode_audio
from media.pcm import Pcm
from pipeline.client import WorkerHandler, WorkerLink
from pipeline.frame_ring import FrameRing
from pipeline.messages import (
    CancelJob,
    CloseSession,
    ForgetAvatar,
    FrameReady,
    FromWorker,
    GenerateVideo,
    JobDone,
    SessionOpened,
    VideoResult,
    WorkerError,
    WorkerReady,
    WorkerStats,
)
from server.access import SECRET_HEADER, Forbidden, same
from server.chat import ChatClient
from server.config import ServerConfig
from server.errors import (
    BadRequest,
    Conflict,
    ErrorCode,
    LipSyncError,
    NotFound,
    TooManyRequests,
    TooManySessions,
    UnknownAvatar,
    UnknownSession,
    WorkerUnavailable,
)
from server.heap import release_free_heap
from server.logcontext import SESSION
from server.metrics import Metrics, exposition
from server.peer import answer_offer
from server.player import IdleCache
from server.session import Session
from server.speech import SpeechLimits
from tts.base import TTSBackend

log = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 120.0
OPEN_GRACE_S = 1.5  # a session waits this long for the worker to open it before it starts anyway
DEFAULT_SESSION_ID = "0"  # what the seed's clients send for "the session"
CANCELLED = "cancelled"
RELEASE_AFTER_S = 3.0  # quiet this long after the last session closed before freed memory is handed back

WorkerFactory = Callable[[WorkerHandler], WorkerLink]


@dataclass
class _Counters:
    video_frames_skipped: int = 0  # by sessions already closed
    worker: WorkerStats | None = None
    recordings: dict[str, tuple[Path, str]] = field(default_factory=dict)  # of closed sessions: path, secret


class SessionManager:
    def __init__(self, config: ServerConfig, tts: TTSBackend, worker_factory: WorkerFactory) -> None:
        self.config = config
        self.tts = tts
        chat = config.chat_config()
        self.chat = ChatClient(chat) if chat is not None else None  # one connection pool for every session's chat
        self.worker: WorkerLink = worker_factory(self)
        self._sessions: dict[str, Session] = {}
        self._avatars: dict[str, Avatar] = {}
        self._idle_yuv: dict[str, IdleCache] = {}
        self._jobs: dict[str, asyncio.Future[JobDone]] = {}
        self._job_keys: dict[str, str] = {}  # job id -> "user/request/chunk", for cancelling
        self._counters = _Counters()
        self._tasks: set[asyncio.Task[None]] = set()
        self._release: asyncio.TimerHandle | None = None
        # Decoding an upload takes a core: a few at a time, on threads of their own, so
        # a flood of uploads queues here instead of starving the media.
        self._decoders = ThreadPoolExecutor(max(1, config.max_decodes), thread_name_prefix="decode")
        self._decoding = 0
        self.metrics = Metrics()

    async def start(self) -> WorkerReady:
        ready = await self.worker.start()
        self._spawn(self._close_idle_sessions())
        return ready

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.close_all()
        if self._release is not None:
            self._release.cancel()
        self.fail_jobs("the server is shutting down")
        await self.worker.stop()
        for avatar in self._avatars.values():
            avatar.release()  # after the worker's: the last to let go removes the decoded-frame cache
        self._decoders.shutdown(wait=False, cancel_futures=True)
        if self.chat is not None:
            await self.chat.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- uploads ----
    async def decode(self, data: bytes, max_seconds: float) -> Pcm:
        """An uploaded audio file as ``Pcm``; refused while ``max_decodes`` are under way."""
        if self._decoding >= self.config.max_decodes:
            raise TooManyRequests(
                f"{self._decoding} audio files are being decoded (at most {self.config.max_decodes} at once): "
                "send this one again in a moment"
            )
        self._decoding += 1
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoders, decode_audio, data, max_seconds)
        except AudioDecodeError:
            raise
        except Exception as exc:  # PyAV on a file it has no decoder for (codec_context None, ...): the upload's fault
            log.warning("decoding an upload failed: %r", exc)
            raise AudioDecodeError(f"the file cannot be decoded ({type(exc).__name__}: {exc})") from None
        finally:
            self._decoding -= 1
            self.metrics.decoded(time.perf_counter() - started)

    async def _close_idle_sessions(self) -> None:
        """Sessions nobody has addressed for ``idle_timeout_s`` and that are not speaking."""
        if self.config.idle_timeout_s <= 0:
            return
        while True:
            await asyncio.sleep(min(30.0, self.config.idle_timeout_s / 2))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if not session.is_speaking and now - session.last_used > self.config.idle_timeout_s:
                    log.info("session %s idle for %.0f s: closing", session.id, now - session.last_used)
                    await self.close(session.id)

    # ---- avatars ----
    def avatar(self, name: str) -> Avatar:
        """A prepared avatar, loaded once and shared by its sessions."""
        try:
            check_name(name)
        except InvalidAvatarName as exc:
            raise BadRequest(str(exc)) from None
        if name not in self._avatars:
            try:
                avatar = load_avatar(self.config.data_dir, name)
            except AvatarNotFound as exc:
                raise UnknownAvatar(f"{exc}; prepare it with: python -m avatars prepare --name {name} --source VIDEO") from None
            if isinstance(avatar.frames, SharedFrames):
                avatar.frames.prefetch()  # decoded ahead of the idle loop, off the event loop
            self._avatars[name] = avatar
        return self._avatars[name]

    def forget_avatar(self, name: str) -> None:
        """The avatar was prepared again: sessions opened from now on get the new one."""
        self._avatars.pop(name, None)
        self._idle_yuv.pop(name, None)
        self.worker.send(ForgetAvatar(name))

    # ---- sessions ----
    def get(self, session_id: str | None, secret: str | None = None, operator: bool = False) -> Session:
        """The session ``session_id`` names, for a caller holding ``secret`` (or the
        operator's token). ``0``, ``"0"``, ``""`` or None is the default session, as the
        seed's and LiveTalking's clients address it: the only open session, and with several
        open, the oldest (unless ``--no-default-session``); it needs no secret."""
        if session_id in (None, "", DEFAULT_SESSION_ID):
            default = self._default()
            default.last_used = time.monotonic()
            SESSION.set(default.id)
            return default
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"unknown session {session_id!r}: open one with POST /offer")
        # the default session's own id needs no more than "0" does (a wrong secret is still wrong)
        is_default = self.config.default_session and next(iter(self._sessions.values())) is session
        if not operator and not (is_default and secret is None) and (secret is None or not same(secret, session.secret)):
            raise Forbidden(
                f"session {session_id!r} needs its secret (the 'secret' POST /offer returned): send it as the "
                f"'secret' field, the {SECRET_HEADER} header or ?secret="
            )
        session.last_used = time.monotonic()
        SESSION.set(session.id)
        return session

    def _default(self) -> Session:
        if not self.config.default_session:
            raise UnknownSession(
                "sessionid 0 (or none) addresses the default session, which this server does not offer "
                "(--no-default-session): send the sessionid that POST /offer returned"
            )
        if not self._sessions:
            raise UnknownSession(
                "no session is open, so there is no default session to address: open one with POST /offer "
                "(a browser on /webrtcapi.html does), then send its sessionid or 0"
            )
        return next(iter(self._sessions.values()))  # dicts keep insertion order: the oldest

    def __len__(self) -> int:
        return len(self._sessions)

    async def open(
        self, offer: RTCSessionDescription, avatar_name: str | None = None, client: str | None = None
    ) -> tuple[Session, RTCSessionDescription]:
        """A new session for a WebRTC offer from ``client`` (its address): the session and the SDP answer."""
        pending = [s for s in self._sessions.values() if s.peer_address == client and not s.connected]
        if client is not None and len(pending) >= self.config.max_pending_offers:
            raise TooManyRequests(
                f"{len(pending)} sessions from {client} have not connected yet (at most {self.config.max_pending_offers}): "
                "finish connecting those, or wait for them to time out"
            )
        session = await self.create(self.avatar(avatar_name or self.config.avatar))
        session.peer_address = client
        try:
            answer = await answer_offer(session, offer, self.config.ice_servers, self.config.connect_timeout_s, self._peer_gone)
        except Exception as exc:  # aiortc raises ValueError and several of its own on SDP it cannot answer
            await self.close(session.id)
            raise BadRequest(f"could not answer this offer: {exc}") from None
        except BaseException:  # cancelled mid-answer: the session must not outlive the request
            await self.close(session.id)
            raise
        log.info("session %s opened with avatar %s", session.id, session.avatar.name)
        return session, answer

    async def watch(self, session: Session, offer: RTCSessionDescription, client: str | None = None) -> RTCSessionDescription:
        """A viewer of ``session``: a receive-only peer fed by its player (no new session)."""
        try:
            return await session.viewers.add(offer, self.config.ice_servers, self.config.connect_timeout_s, client)
        except LipSyncError:
            raise
        except Exception as exc:  # aiortc on SDP it cannot answer, as in open()
            raise BadRequest(f"could not answer this offer: {exc}") from None

    async def create(self, avatar: Avatar) -> Session:
        """A session on ``avatar``, opened in the worker, with no peer yet."""
        if len(self._sessions) >= self.config.max_sessions:
            raise TooManySessions(
                f"the server is at its limit of {self.config.max_sessions} sessions; try again later or raise --max-sessions"
            )
        if not self.worker.alive:
            raise WorkerUnavailable("the inference worker is not running; try again in a moment")
        session_id = secrets.token_hex(8)
        ring = FrameRing.create(self.config.ring_slots, avatar.frame_shape, tag=session_id)
        limits = SpeechLimits(self.config.max_queued_utterances, self.config.max_queued_speech_s)
        SESSION.set(session_id)  # its tasks and this request's log lines carry its id
        session = Session(
            session_id, avatar, ring, self.tts, self.worker, self._idle_yuv.setdefault(avatar.name, {}), limits, self.metrics.observe,
            chat=self.chat, max_viewers=self.config.max_viewers,
        )
        self._sessions[session_id] = session
        self.worker.send(session.open_message())
        try:
            result = await asyncio.wait_for(asyncio.shield(session.opened), OPEN_GRACE_S)
        except asyncio.TimeoutError:
            # The engine is still making its material for this avatar (its first use). The
            # video needs no worker (idle frames come from here), and speech sent meanwhile
            # waits in the worker's queue behind the open, so the session starts now.
            log.info("session %s: the engine is still preparing avatar %s; starting on idle frames", session_id, avatar.name)
            self._spawn(self._finish_open(session))
            return session
        if not result.ok:
            await self.close(session_id)
            raise WorkerUnavailable(f"the inference worker could not open the session: {result.error}")
        return session

    async def _finish_open(self, session: Session) -> None:
        """A session that started before the worker had opened it: closed, with an
        ``error`` event saying why, if the worker then fails or never answers."""
        try:
            result = await asyncio.wait_for(asyncio.shield(session.opened), OPEN_TIMEOUT_S)
            error = None if result.ok else f"the inference worker could not open the session: {result.error}"
        except asyncio.TimeoutError:
            error = "the inference worker did not open the session in time"
        if error is not None and self._sessions.get(session.id) is session:
            session.on_worker_error(WorkerError(session.id, error))
            await self.close(session.id)

    def _peer_gone(self, session_id: str) -> None:
        task = asyncio.ensure_future(self.close(session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._counters.video_frames_skipped += session.player.video_frames_skipped
        self.worker.send(CloseSession(session_id))
        await session.close()
        if session.last_recording is not None:
            self._counters.recordings[session_id] = (session.last_recording, session.secret)
        log.info("session %s closed (%d open)", session_id, len(self._sessions))
        if not self._sessions:
            self._release_when_idle()

    def _release_when_idle(self) -> None:
        """Once no session has been open for ``RELEASE_AFTER_S``, hand the heap's free
        pages back to the system (see ``server.heap``); a session opening meanwhile, or
        another closing, puts it off."""
        if self._release is not None:
            self._release.cancel()

        def release() -> None:
            self._release = None
            if not self._sessions:
                release_free_heap()

        self._release = asyncio.get_running_loop().call_later(RELEASE_AFTER_S, release)

    async def close_all(self) -> None:
        for session_id in list(self._sessions):
            await self.close(session_id)

    # ---- recordings ----
    def recording_path(self, session: Session) -> Path:
        return Path(self.config.data_dir) / "recordings" / f"{session.id}-{_timestamp()}.mp4"

    def recording(self, session_id: str, secret: str | None = None, operator: bool = False) -> Path:
        """The last finished recording of a session, open or closed (its secret, or the token)."""
        session = self._sessions.get(session_id)
        found: tuple[Path, str] | None = None
        if session is not None and session.last_recording is not None:
            found = (session.last_recording, session.secret)
        found = found or self._counters.recordings.get(session_id)
        if found is None or not found[0].is_file():
            raise NotFound(f"no finished recording for session {session_id!r}")
        path, owner = found
        if not operator and (secret is None or not same(secret, owner)):
            raise Forbidden(f"the recording of session {session_id!r} needs the session's secret: ?secret=")
        return path

    # ---- offline jobs ----
    async def generate_video(self, avatar: str, audio_path: Path, out_path: Path, key: str = "") -> VideoResult:
        """An offline mp4 rendered by the worker, with the engine and weights it already
        holds, in the gaps between live sessions' batches. ``key`` names the job for
        ``cancel_jobs``; a job still running after ``job_timeout_s`` is cancelled."""
        if not self.worker.alive:
            raise WorkerUnavailable("the inference worker is not running; try again in a moment")
        job_id = secrets.token_hex(8)
        future: asyncio.Future[JobDone] = asyncio.get_running_loop().create_future()
        self._jobs[job_id] = future
        self._job_keys[job_id] = key
        self.worker.send(GenerateVideo(job_id, avatar, str(audio_path), str(out_path)))
        try:
            done = await asyncio.wait_for(asyncio.shield(future), self.config.job_timeout_s)
        except asyncio.TimeoutError:
            self.worker.send(CancelJob(job_id, "past its time"))
            raise WorkerUnavailable(
                f"the job ran longer than {self.config.job_timeout_s:.0f} s and was cancelled: send shorter audio"
            ) from None
        finally:
            self._jobs.pop(job_id, None)
            self._job_keys.pop(job_id, None)
        if done.result is None:
            if done.error.startswith(CANCELLED):
                raise Conflict(f"the job was cancelled: {done.error}")
            raise LipSyncError(f"could not render {audio_path.name}: {done.error}", ErrorCode.UNSUPPORTED_AUDIO)
        return done.result

    def cancel_jobs(self, key_prefix: str) -> int:
        """Cancel the running jobs whose key starts with ``key_prefix``; how many."""
        hits = [job_id for job_id, key in self._job_keys.items() if key.startswith(key_prefix)]
        for job_id in hits:
            self.worker.send(CancelJob(job_id, f"{CANCELLED} (DELETE /digital_human/gen)"))
        return len(hits)

    # ---- figures ----
    def stats(self, with_ids: bool = False) -> dict[str, Any]:
        """Server figures; session ids only for the operator (``with_ids``): an id is half
        of what drives a session."""
        w = self._counters.worker
        ready = self.worker.ready_info
        skipped = {sid: s.player.video_frames_skipped for sid, s in self._sessions.items()}
        out: dict[str, Any] = {
            "sessions": len(self._sessions),
            "max_sessions": self.config.max_sessions,
            "engine": ready.engine if ready else None,
            "worker_pid": self.worker.pid,
            "worker_restarts": self.worker.restarts,
            "frames_rendered": w.frames_rendered if w else 0,
            "render_seconds": round(w.render_seconds, 3) if w else 0.0,
            "video_frames_skipped_total": self._counters.video_frames_skipped + sum(skipped.values()),
            "viewers": sum(len(s.viewers) for s in self._sessions.values()),  # peers watching a session (POST /offer watch)
            "chat": self.chat is not None,
        }
        if with_ids:
            out["video_frames_skipped"] = skipped
        return out

    def health(self) -> dict[str, Any]:
        """Whether the server can serve: its worker is up. ``ok`` False means a 503."""
        ready = self.worker.ready_info
        return {
            "ok": self.worker.alive,
            "worker": {"alive": self.worker.alive, "pid": self.worker.pid, "restarts": self.worker.restarts,
                       "engine": ready.engine if ready else None},
            "sessions": len(self._sessions),
            "speaking": sum(s.is_speaking for s in self._sessions.values()),
        }

    def metrics_text(self) -> str:
        """Prometheus text exposition of the server's figures (no session ids)."""
        w = self._counters.worker
        rendered = w.frames_rendered if w else 0
        skipped = self._counters.video_frames_skipped + sum(s.player.video_frames_skipped for s in self._sessions.values())
        gauges = {
            "lipsync_sessions": ("open sessions", len(self._sessions)),
            "lipsync_speaking_sessions": ("sessions speaking now", sum(s.is_speaking for s in self._sessions.values())),
            "lipsync_queued_utterances": ("utterances queued or speaking, all sessions",
                                          sum(s.feeder.queued for s in self._sessions.values())),
            "lipsync_frames_rendered": ("speaking frames the worker rendered", rendered),
            "lipsync_video_frames_skipped": ("video frames skipped because an encoder fell behind", skipped),
            "lipsync_worker_batch_max": ("the largest batch the worker rendered", w.max_batch if w else 0),
            "lipsync_worker_frames_per_second": ("speaking frames rendered a second, since the last scrape",
                                                 self.metrics.frames_rate(rendered)),
            "lipsync_worker_up": ("1 while the inference worker runs", 1.0 if self.worker.alive else 0.0),
            "lipsync_worker_restarts": ("times the worker was replaced", self.worker.restarts),
        }
        return exposition(self.metrics, gauges)

    # ---- WorkerHandler ----
    def on_worker_message(self, msg: FromWorker) -> None:
        match msg:
            case FrameReady():
                session = self._sessions.get(msg.session_id)
                if session is not None:
                    session.on_frame(msg)
                # else: the session is gone and its ring unlinked with it
            case SessionOpened():
                session = self._sessions.get(msg.session_id)
                if session is not None and not session.opened.done():
                    session.opened.set_result(msg)
            case WorkerError():
                session = self._sessions.get(msg.session_id)
                if session is not None:
                    session.on_worker_error(msg)
                else:
                    log.error("worker: %s", msg.message)
            case JobDone():
                future = self._jobs.get(msg.job_id)
                if future is not None and not future.done():
                    future.set_result(msg)
            case WorkerStats():
                self._counters.worker = msg
            case WorkerReady():
                pass  # the client consumes it while starting

    def fail_jobs(self, why: str) -> None:
        """Answer every job still waiting, so no request hangs on one."""
        for job_id, future in list(self._jobs.items()):
            if not future.done():
                future.set_result(JobDone(job_id, None, error=why))

    async def on_worker_restart(self) -> None:
        self.fail_jobs("the inference worker restarted during the job; send it again")
        for session in list(self._sessions.values()):
            session.on_worker_lost()
            self.worker.send(session.open_message())


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
