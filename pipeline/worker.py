"""The inference worker process: PCM in, rendered frames out through each session's ring.

One worker serves every session, so the engine's weights exist once. Each pass of the
loop takes what is waiting on the inbox, then renders one batch drawn across all
speaking sessions (the session with the fewest frames buffered first), writing each
frame straight into a free slot of its session's ring. A session whose ring is full is
skipped until the server frees a slot: that is the backpressure, and a silent session
is never rendered at all.
"""
from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatars.avatar import Avatar, load_avatar
from pipeline.engines import EngineUnavailable, FeatureStream, LipSyncEngine, RenderItem, create_engine
from pipeline.frame_ring import FrameRing
from pipeline.messages import (
    SAMPLES_PER_FRAME,
    AudioChunk,
    CloseSession,
    ForgetAvatar,
    FrameReady,
    GenerateVideo,
    Interrupt,
    JobDone,
    OpenSession,
    SessionOpened,
    Shutdown,
    WorkerError,
    WorkerReady,
    WorkerStats,
)

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # nothing to render: block on the inbox this long
FULL_WAIT_S = 0.004  # work waiting but rings full: poll for freed slots this often
STATS_EVERY_S = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    engine: str
    data_dir: str
    engine_options: dict[str, Any] = field(default_factory=dict)
    max_batch: int | None = None
    log_level: int = logging.INFO


@dataclass
class _Utterance:
    utterance_id: str
    stream: FeatureStream
    start_cursor: int
    pcm: bytearray = field(default_factory=bytearray)  # int16 bytes not yet handed to a frame
    features: deque = field(default_factory=deque)
    produced: int = 0  # features produced so far
    sent: int = 0  # frames rendered and sent
    final: bool = False

    def frame_audio(self) -> bytes:
        """The next frame's exact 40 ms, zero-padded past the end of the utterance."""
        nbytes = SAMPLES_PER_FRAME * 2
        chunk = bytes(self.pcm[:nbytes])
        del self.pcm[:nbytes]
        return chunk.ljust(nbytes, b"\0")

    @property
    def done(self) -> bool:
        return self.final and self.sent == self.produced


@dataclass
class _Session:
    session_id: str
    avatar: Avatar
    ring: FrameRing
    generation: int = 0
    cursor: int = 0  # avatar frame index of the next frame to render
    utterances: deque = field(default_factory=deque)

    def ready(self) -> bool:
        return bool(self.utterances) and bool(self.utterances[0].features)

    def in_flight(self) -> int:
        return self.ring.slots - self.ring.free_count()


class WorkerLoop:
    def __init__(self, engine: LipSyncEngine, data_dir: Path, outbox: Any, max_batch: int | None = None) -> None:
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.outbox = outbox
        self.max_batch = max(1, max_batch or engine.max_batch)
        self.avatars: dict[str, Avatar] = {}
        self.sessions: dict[str, _Session] = {}
        self.frames_rendered = 0
        self.batches = 0
        self.render_seconds = 0.0
        self.biggest_batch = 0
        self._last_stats = time.monotonic()
        self.jobs: deque[tuple[str, Any]] = deque()  # (job id, step generator), oldest first

    # ---- messages ----
    def handle(self, msg: Any) -> bool:
        """Apply one inbox message; False means shut down."""
        if isinstance(msg, AudioChunk):
            self._on_audio(msg)
        elif isinstance(msg, Interrupt):
            self._on_interrupt(msg)
        elif isinstance(msg, OpenSession):
            self._on_open(msg)
        elif isinstance(msg, CloseSession):
            self._on_close(msg)
        elif isinstance(msg, GenerateVideo):
            self._on_job(msg)
        elif isinstance(msg, ForgetAvatar):
            self.avatars.pop(msg.avatar, None)
        elif isinstance(msg, Shutdown):
            return False
        else:
            log.warning("worker ignored unknown message %r", type(msg).__name__)
        return True

    def _avatar(self, name: str) -> Avatar:
        if name not in self.avatars:
            avatar = load_avatar(self.data_dir, name)
            started = time.monotonic()
            self.engine.prepare(avatar)
            log.info("prepared avatar %s for %s in %.2f s", name, self.engine.name, time.monotonic() - started)
            self.avatars[name] = avatar
        return self.avatars[name]

    def _on_open(self, msg: OpenSession) -> None:
        try:
            avatar = self._avatar(msg.avatar)
            if avatar.frame_shape != tuple(msg.frame_shape):
                raise ValueError(f"ring frame shape {msg.frame_shape} != avatar {avatar.frame_shape}")
            ring = FrameRing.attach(msg.ring_name, msg.ring_slots, msg.frame_shape)
        except Exception as exc:  # the session fails, the worker carries on
            log.exception("could not open session %s", msg.session_id)
            self.outbox.put(SessionOpened(msg.session_id, ok=False, error=str(exc)))
            return
        old = self.sessions.pop(msg.session_id, None)
        if old is not None:
            old.ring.close()
        self.sessions[msg.session_id] = _Session(msg.session_id, avatar, ring)
        self.outbox.put(SessionOpened(msg.session_id, ok=True))

    def _on_job(self, msg: GenerateVideo) -> None:
        from pipeline.offline import iter_generate_video  # PyAV muxing; only jobs need it

        try:
            steps = iter_generate_video(self.data_dir, self._avatar(msg.avatar), msg.audio_path, msg.out_path, self.engine)
        except Exception as exc:
            self.outbox.put(JobDone(msg.job_id, ok=False, error=str(exc)))
            return
        self.jobs.append((msg.job_id, steps))

    def step_job(self) -> bool:
        """Advance the oldest offline job by one batch; False when there is none."""
        if not self.jobs:
            return False
        job_id, steps = self.jobs[0]
        try:
            next(steps)
        except StopIteration as done:
            self.jobs.popleft()
            self.outbox.put(JobDone(job_id, ok=True, result=done.value))
        except Exception as exc:  # the job fails, the worker and its sessions carry on
            log.warning("offline job %s failed: %s", job_id, exc)
            self.jobs.popleft()
            self.outbox.put(JobDone(job_id, ok=False, error=f"{type(exc).__name__}: {exc}"))
        return True

    def _on_close(self, msg: CloseSession) -> None:
        session = self.sessions.pop(msg.session_id, None)
        if session is not None:
            session.ring.close()

    def _on_interrupt(self, msg: Interrupt) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        session.generation = max(session.generation, msg.generation)
        session.utterances.clear()

    def _on_audio(self, msg: AudioChunk) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None or msg.generation < session.generation:
            return  # closed, or from before an interrupt
        session.generation = msg.generation
        utt = session.utterances[-1] if session.utterances else None
        if utt is None or utt.utterance_id != msg.utterance_id or utt.final:
            # Continue the idle motion where the server says it will be, unless frames of
            # an earlier utterance are still queued: then speech follows on from those.
            start = msg.start_cursor if not session.utterances and session.in_flight() == 0 else session.cursor
            utt = _Utterance(msg.utterance_id, self.engine.new_stream(), start)
            session.utterances.append(utt)
        if msg.pcm:
            utt.pcm.extend(msg.pcm)
            pcm = np.frombuffer(msg.pcm, np.int16).astype(np.float32) / 32768.0
            utt.features.extend(utt.stream.push(pcm))
        if msg.final:
            utt.features.extend(utt.stream.flush())
            utt.final = True
        utt.produced = utt.sent + len(utt.features)

    # ---- rendering ----
    def has_work(self) -> bool:
        return any(s.ready() for s in self.sessions.values())

    def render_batch(self) -> int:
        """Render one batch across sessions; returns how many frames went out."""
        candidates = [s for s in self.sessions.values() if s.ready() and s.ring.free_count() > 0]
        if not candidates:
            self._drop_finished()
            return 0
        candidates.sort(key=lambda s: s.in_flight())
        # (session, utterance, slot, offset into the utterance's pending features)
        picks: list[tuple[_Session, _Utterance, int, int]] = []
        taken = {s.session_id: 0 for s in candidates}
        progress = True
        while len(picks) < self.max_batch and progress:
            progress = False
            for s in candidates:
                utt = s.utterances[0]
                k = taken[s.session_id]
                if k >= len(utt.features) or len(picks) >= self.max_batch:
                    continue
                slot = s.ring.acquire()
                if slot is None:
                    continue
                picks.append((s, utt, slot, k))
                taken[s.session_id] = k + 1
                progress = True
        if not picks:
            return 0
        items = [
            RenderItem(s.avatar.name, s.avatar.idle_index(utt.start_cursor + utt.sent + k), utt.features[k])
            for s, utt, _slot, k in picks
        ]
        outs = [s.ring.view(slot) for s, _u, slot, _k in picks]
        started = time.perf_counter()
        try:
            self.engine.render(items, outs)
        except Exception as exc:
            log.exception("render failed for %d frames", len(picks))
            for s, _u, slot, _k in picks:
                s.ring.abandon(slot)
            for s in {id(s): s for s, *_ in picks}.values():
                s.utterances.clear()
                self.outbox.put(WorkerError(s.session_id, f"render failed: {exc}"))
            return 0
        self.render_seconds += time.perf_counter() - started
        for (s, utt, slot, _k), item in zip(picks, items):
            utt.features.popleft()
            seq = utt.sent
            utt.sent += 1
            s.cursor = utt.start_cursor + utt.sent
            last = utt.done
            s.ring.publish(slot)
            self.outbox.put(
                FrameReady(
                    s.session_id, s.generation, utt.utterance_id, seq, slot,
                    item.avatar_index, utt.start_cursor + seq, utt.frame_audio(), last,
                )
            )
        self._drop_finished()
        self.frames_rendered += len(picks)
        self.batches += 1
        self.biggest_batch = max(self.biggest_batch, len(picks))
        return len(picks)

    def _drop_finished(self) -> None:
        for s in self.sessions.values():
            while s.utterances and s.utterances[0].done:
                s.utterances.popleft()

    def maybe_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats >= STATS_EVERY_S:
            self._last_stats = now
            self.outbox.put(WorkerStats(self.frames_rendered, self.batches, self.render_seconds, self.biggest_batch))

    def close(self) -> None:
        for _job_id, steps in self.jobs:
            steps.close()
        self.jobs.clear()
        for s in self.sessions.values():
            s.ring.close()
        self.sessions.clear()
        self.engine.close()

    def run(self, inbox: Any) -> None:
        parent = os.getppid()
        running = True
        while running:
            if os.getppid() != parent:
                # The server was killed without telling us: nobody will read our frames,
                # and exiting lets the server's resource tracker free its segments.
                log.warning("server process %d is gone; worker exiting", parent)
                return
            if self.has_work():
                timeout = FULL_WAIT_S
            else:
                timeout = 0.0 if self.jobs else IDLE_WAIT_S
            try:
                msg = inbox.get(timeout=timeout)
            except queue.Empty:
                msg = None
            while msg is not None and running:
                running = self.handle(msg)
                try:
                    msg = inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if running:
                rendered = 0
                while n := self.render_batch():
                    rendered += n
                    # Keep rendering while slots are free, but look at the inbox between
                    # batches so an interrupt is never stuck behind a long render queue.
                    if not inbox.empty():
                        break
                if not rendered:
                    # Offline jobs get the engine only when no live session can use it.
                    self.step_job()
                self.maybe_stats()


def run_worker(config: WorkerConfig, inbox: Any, outbox: Any) -> None:
    """Entry point of the worker process (started with spawn)."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s worker[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        engine = create_engine(config.engine, Path(config.data_dir), **config.engine_options)
    except (EngineUnavailable, ValueError) as exc:
        log.error("engine %s unavailable: %s", config.engine, exc)
        outbox.put(WorkerError("", f"engine {config.engine!r} unavailable: {exc}"))
        return
    loop = WorkerLoop(engine, Path(config.data_dir), outbox, config.max_batch)
    outbox.put(WorkerReady(engine.name, os.getpid(), {"max_batch": loop.max_batch}))
    try:
        loop.run(inbox)
    finally:
        loop.close()
