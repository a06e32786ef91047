"""One live session: a WebRTC peer watching one avatar.

A session is its roles wired together, each owning one thing:

* ``events`` (``SessionEvents``): what listeners hear;
* ``feeder`` (``SpeechFeeder``): speech in, PCM to the worker; owns the generation;
* ``player`` (``SessionPlayer``): each 40 ms frame decided once; owns the idle cursor;
* frame sinks on the player: recorders (and whatever else wants every frame);
* ``viewers`` (``Viewers``): other peers watching the same frames;
* ``chat`` (``ChatRole``, when a chat model is configured): replies streamed and spoken.

The session's own methods are what routes call; each does one thing through its roles.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiortc import RTCPeerConnection
from aiortc.contrib.media import MediaBlackhole

from avatars.avatar import Avatar
from avatars.clips import IDLE_NUMBERS, Clip, describe_clips, find_clip
from media.pcm import Pcm
from pipeline.client import WorkerLink
from pipeline.frame_ring import FrameRing
from pipeline.messages import FrameReady, OpenSession, SessionOpened, WorkerError
from server.access import new_secret
from server.chat import ChatClient
from server.chat_session import ChatRole
from server.errors import BadRequest, Conflict, ErrorCode
from server.events import Closed, ErrorEvent, SessionEvent, SessionEvents
from server.player import IdleCache, SessionPlayer
from server.recorder import Recorder
from server.speech import DEFAULT_LIMITS, SpeechFeeder, SpeechLimits, StreamedPcm
from server.viewers import Viewers
from tts.base import TTSBackend

log = logging.getLogger(__name__)


# What the seed's README sends as ``audiotype`` ("stereo": an audio mode, not a clip):
# accepted and ignored whatever clips the avatar has, so its example keeps working.
SEED_AUDIO_MODES = frozenset({"stereo", "mono"})


@dataclass(frozen=True)
class Cut:
    """What an interrupt stopped."""

    utterances: list[str]  # cut off, queued or speaking
    last_frame: int  # the newest frame already decided; every later one is silent


class Session:
    def __init__(
        self,
        session_id: str,
        avatar: Avatar,
        ring: FrameRing,
        tts: TTSBackend,
        worker: WorkerLink,
        idle_yuv: IdleCache,
        limits: SpeechLimits = DEFAULT_LIMITS,
        observer: Callable[[SessionEvent], None] | None = None,
        chat: ChatClient | None = None,
        max_viewers: int = 8,
    ) -> None:
        self.id = session_id
        self.secret = new_secret()  # issued with the session: its id alone does not drive it
        self.avatar = avatar
        self.ring = ring
        self._worker = worker
        self.events = SessionEvents(session_id, observer=observer)
        self.feeder = SpeechFeeder(
            session_id, tts, worker.send, lambda: self.player.cursor, self.events, lambda: self.player.speech_shown, limits
        )
        self.player = SessionPlayer(avatar, ring, lambda: self.feeder.generation, listener=self, idle_yuv=idle_yuv)
        self.pc: RTCPeerConnection | None = None
        self.inbound: MediaBlackhole | None = None  # what the client sends, dropped
        self.opened: asyncio.Future[SessionOpened] = asyncio.get_running_loop().create_future()
        self.created_at = time.monotonic()
        self.last_used = self.created_at  # the last call that addressed it: idle sessions are closed
        self.peer_address: str | None = None  # who opened it
        self.closed = False
        self._recorder: Recorder | None = None
        self.last_recording: Path | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.viewers = Viewers(session_id, self.player, max_viewers)
        self.chat = None if chat is None else ChatRole(
            session_id, chat, self.events, lambda text, voice, reply: self.say(text, voice=voice, reply=reply),
            self.interrupt, self.keep,
        )

    def keep(self, task: asyncio.Task[None]) -> None:
        """Hold a background task of this session until it ends or the session closes."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def connected(self) -> bool:
        """Its peer completed ICE (a session made without a peer counts as connected)."""
        return self.pc is None or self.pc.connectionState == "connected"

    def open_message(self) -> OpenSession:
        """What tells a worker about this session (on creation, and again after a restart)."""
        return OpenSession(self.id, self.avatar.name, self.ring.name, self.ring.slots, self.avatar.frame_shape)

    # ---- speech ----
    @property
    def is_speaking(self) -> bool:
        """Speech queued or on air, or a chat reply still being written (its first sentence
        may not be queued yet, but the session is about to speak)."""
        reply = self.chat.current if self.chat is not None else None
        return self.feeder.is_speaking or (reply is not None and reply.in_progress)

    def say(self, text: str, interrupt: bool = False, voice: str | None = None, reply: str | None = None) -> str:
        if interrupt:
            self.interrupt()
        return self.feeder.say(text, voice, reply)

    def play_audio(self, pcm: Pcm, interrupt: bool = False) -> str:
        if interrupt:
            self.interrupt()
        return self.feeder.play(pcm)

    def stream_audio(self) -> tuple[str, StreamedPcm]:
        """A streamed segment (``/audio_stream``): queued now, its audio pushed as it arrives
        (``feeder.push_stream``), played from the player's start buffer."""
        segment, source = self.feeder.stream()
        self.player.hold_start(segment)
        return segment, source

    def interrupt(self) -> Cut:
        """Stop speaking now, and any action clip with it (as LiveTalking's interrupt does);
        a chat reply being written stops too (the model's stream is closed)."""
        if self.chat is not None:
            self.chat.cut()
        last_frame = self.player.last_decided
        self.player.cut()
        self.player.play_idle()
        return Cut(self.feeder.interrupt(), last_frame)

    # ---- the idle loop and action clips ----
    @property
    def audiotype(self) -> int:
        """What plays while silent: 0 the idle loop, else the clip's number."""
        clip = self.player.clip
        return clip.number if clip is not None else 0

    def set_clip(self, audiotype: int | str, reinit: bool) -> dict[str, object]:
        """Choose what plays while silent, by number or name: 0 or 1 the idle loop (LiveTalking's
        "normal" and "silence"), 2.. the avatar's action clips (``avatars.clips``); ``reinit``
        restarts it. A clip chosen while speaking starts when the speech stops.

        An unknown number is a 400 listing the clips. So is an unknown name on an avatar with
        clips, except the seed's audio modes ("stereo": its README's example), which switch
        nothing and say so; on an avatar without clips no name can mean anything, and none
        is refused (as before clips existed)."""
        clips = self.avatar.clips
        listing = f"its clips: {describe_clips(clips)}; 0 or 1 is the idle loop"
        clip: Clip | None = None
        if isinstance(audiotype, str):
            clip = find_clip(clips, audiotype)
            if clip is None:
                if clips and audiotype.lower() not in SEED_AUDIO_MODES:
                    raise BadRequest(f"avatar {self.avatar.name!r} has no action clip named {audiotype!r} ({listing})")
                if reinit:
                    self.player.restart()
                return {"audiotype": audiotype, "switched": False, "reinit": reinit,
                        "reason": f"avatar {self.avatar.name!r} has no action clip named {audiotype!r} ({listing}); "
                                  "what played plays on"}
        elif audiotype not in IDLE_NUMBERS:
            clip = find_clip(clips, audiotype)
            if clip is None:
                raise BadRequest(f"audiotype {audiotype} is not a clip of avatar {self.avatar.name!r} ({listing})")
        if clip is None:
            self.player.play_idle(restart=reinit)
            return {"audiotype": audiotype, "switched": True, "reinit": reinit, "clip": None}
        self.player.play_clip(clip, restart=reinit)
        return {"audiotype": clip.number, "switched": True, "reinit": reinit, "clip": clip.name}

    # ---- PlaybackListener: the player's news ----
    def on_playback_started(self, utterance_id: str) -> None:
        self.feeder.started(utterance_id)

    def on_playback_ended(self, utterance_id: str) -> None:
        self.feeder.ended(utterance_id)

    # ---- the worker's news ----
    def on_frame(self, msg: FrameReady) -> None:
        self.player.push(msg)

    def on_worker_error(self, msg: WorkerError) -> None:
        self.events.publish(ErrorEvent(int(ErrorCode.WORKER_UNAVAILABLE), msg.message))
        self.interrupt()

    def on_worker_lost(self) -> None:
        """The worker died: what it held for us is gone; show idle until it is back."""
        self.player.cut()
        self.ring.reset()
        self.feeder.worker_lost()

    # ---- recording ----
    def start_record(self, path: Path) -> None:
        if self._recorder is not None:
            raise Conflict("this session is already recording; send end_record first")
        self._recorder = Recorder(path, self.avatar.width, self.avatar.height)
        self.player.add_sink(self._recorder.add)

    async def end_record(self) -> Path:
        if self._recorder is None:
            raise Conflict("this session is not recording; send start_record first")
        recorder, self._recorder = self._recorder, None
        self.player.remove_sink(recorder.add)
        path = await asyncio.get_running_loop().run_in_executor(None, recorder.finish)
        self.last_recording = path
        return path

    # ---- teardown ----
    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self.chat is not None:
            self.chat.close()
        self.feeder.close()
        self.events.publish(Closed())
        if self._recorder is not None:
            try:
                await self.end_record()
            except Exception:
                log.exception("session %s: finishing the recording failed", self.id)
        await self.viewers.close()
        self.player.close()
        if self.pc is not None:
            await self.pc.close()
        if self.inbound is not None:
            await self.inbound.stop()
        self.ring.close()
