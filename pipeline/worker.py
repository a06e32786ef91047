"""The inference worker process: PCM in, rendered frames out through each session's ring.

One worker serves every session, so the engine's weights exist once. Each pass of the
loop takes what is waiting on the inbox, then renders one batch drawn across all
speaking sessions (the session with the fewest frames buffered first), writing each
frame straight into a free slot of its session's ring. A session whose ring is full is
skipped until the server frees a slot: that is the backpressure, and a silent session
is never rendered at all.

A thread of its own sends a ``Heartbeat`` every ``HEARTBEAT_EVERY_S``, so the server can
tell a stopped or wedged process (no heartbeats) from a long render (heartbeats, with a
growing ``busy_s``). The thread needs the GIL only for a moment each time: the engines'
numpy, OpenCV and torch calls release it, and pure-Python work yields it every few
milliseconds, so only one C call that held the GIL longer than the server's
``heartbeat_s`` (5 s by default) would read as a hang.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from avatars.avatar import Avatar, load_avatar
from media.pcm import PcmFifo, to_float
from media.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipeline.engines import EngineUnavailable, FeatureStream, LipSyncEngine, RenderItem, create_engine
from pipeline.frame_ring import FrameRing
from pipeline.messages import (
    AudioChunk,
    CancelJob,
    CloseSession,
    ForgetAvatar,
    FrameReady,
    FromWorker,
    GenerateVideo,
    Heartbeat,
    Interrupt,
    JobDone,
    OpenSession,
    SessionOpened,
    Shutdown,
    ToWorker,
    VideoResult,
    WorkerError,
    WorkerReady,
    WorkerStats,
)

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # nothing to render: block on the inbox this long
FULL_WAIT_S = 0.004  # work waiting but rings full: poll for freed slots this often
STATS_EVERY_S = 1.0
HEARTBEAT_EVERY_S = 0.5  # the server replaces a worker silent for its heartbeat_s (5 s by default)

F = TypeVar("F")


class Outbox(Protocol):
    """Where the worker puts what it sends back (the result queue, or a test's list)."""

    def put(self, msg: FromWorker) -> None: ...


@dataclass(frozen=True)
class WorkerConfig:
    engine: str
    data_dir: str
    engine_options: dict[str, str | int | float | bool] = field(default_factory=dict)
    max_batch: int | None = None
    log_level: int = logging.INFO


@dataclass
class _Utterance(Generic[F]):
    utterance_id: str
    generation: int  # echoed on every frame, so the server can drop stale ones
    stream: FeatureStream[F]
    start_cursor: int
    pcm: PcmFifo = field(default_factory=PcmFifo)  # samples not yet handed to a frame
    sent: int = 0  # frames rendered and sent

    @property
    def done(self) -> bool:
        return self.stream.finished and self.stream.ready() == 0

    @property
    def end_cursor(self) -> int:
        """Idle-loop position just after this utterance's last frame (known once its audio is complete)."""
        return self.start_cursor + self.sent + self.stream.ready()


@dataclass
class _Session(Generic[F]):
    session_id: str
    avatar: Avatar
    ring: FrameRing
    cursor: int = 0  # idle-loop position of the next frame to render
    utterances: deque[_Utterance[F]] = field(default_factory=deque)

    def ready(self) -> bool:
        return bool(self.utterances) and self.utterances[0].stream.ready() > 0

    def in_flight(self) -> int:
        return self.ring.slots - self.ring.free_count()

    def next_start(self, asked: int) -> int:
        """Where a new utterance starts on the idle loop: where the server asked (it knows
        what is on screen) unless earlier speech is still queued or unshown; then right
        after that speech, so one utterance follows another without a jump."""
        if self.utterances:
            return self.utterances[-1].end_cursor
        return self.cursor if self.in_flight() else asked


Job = Generator[int, None, VideoResult]


class WorkerLoop(Generic[F]):
    def __init__(self, engine: LipSyncEngine[F], data_dir: Path, outbox: Outbox, max_batch: int | None = None) -> None:
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.outbox = outbox
        self.max_batch = max(1, max_batch or engine.max_batch)
        self.avatars: dict[str, Avatar] = {}
        self.sessions: dict[str, _Session[F]] = {}
        self.frames_rendered = 0
        self.batches = 0
        self.render_seconds = 0.0
        self.biggest_batch = 0
        self._last_stats = time.monotonic()
        self.pass_started = time.monotonic()  # when the current pass of run() began (read by the heartbeat)
        self.jobs: deque[tuple[str, Job]] = deque()  # (job id, steps), oldest first

    # ---- messages ----
    def handle(self, msg: ToWorker) -> bool:
        """Apply one inbox message; False means shut down."""
        match msg:
            case AudioChunk():
                self._on_audio(msg)
            case Interrupt():
                self._on_interrupt(msg)
            case OpenSession():
                self._on_open(msg)
            case CloseSession():
                self._on_close(msg)
            case GenerateVideo():
                self._on_job(msg)
            case CancelJob():
                self._on_cancel(msg)
            case ForgetAvatar():
                self.avatars.pop(msg.avatar, None)
            case Shutdown():
                return False
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
            self.outbox.put(JobDone(msg.job_id, None, error=str(exc)))
            return
        self.jobs.append((msg.job_id, steps))

    def _on_cancel(self, msg: CancelJob) -> None:
        for entry in [e for e in self.jobs if e[0] == msg.job_id]:
            self.jobs.remove(entry)
            entry[1].close()  # the generator's cleanup removes the partial file
            self.outbox.put(JobDone(msg.job_id, None, error=msg.reason))

    def step_job(self) -> bool:
        """Advance the oldest offline job by one batch; False when there is none."""
        if not self.jobs:
            return False
        job_id, steps = self.jobs[0]
        try:
            next(steps)
        except StopIteration as done:
            self.jobs.popleft()
            self.outbox.put(JobDone(job_id, done.value))
        except Exception as exc:  # the job fails, the worker and its sessions carry on
            log.warning("offline job %s failed: %s", job_id, exc)
            self.jobs.popleft()
            self.outbox.put(JobDone(job_id, None, error=f"{type(exc).__name__}: {exc}"))
        return True

    def _on_close(self, msg: CloseSession) -> None:
        session = self.sessions.pop(msg.session_id, None)
        if session is not None:
            session.ring.close()

    def _on_interrupt(self, msg: Interrupt) -> None:
        session = self.sessions.get(msg.session_id)
        if session is not None:
            session.utterances.clear()

    def _on_audio(self, msg: AudioChunk) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return  # closed
        if msg.sample_rate != SAMPLE_RATE:
            problem = f"audio at {msg.sample_rate} Hz; the worker takes {SAMPLE_RATE} Hz"
            self.outbox.put(WorkerError(msg.session_id, problem, msg.utterance_id))
            return
        utt = session.utterances[-1] if session.utterances else None
        if utt is None or utt.utterance_id != msg.utterance_id or utt.stream.finished:
            start = session.next_start(msg.start_cursor)
            utt = _Utterance(msg.utterance_id, msg.generation, self.engine.new_stream(), start)
            session.utterances.append(utt)
        if msg.pcm.size:
            utt.pcm.append(msg.pcm)
            utt.stream.push(to_float(msg.pcm))
        if msg.final:
            utt.stream.finish()

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
        picks: list[tuple[_Session[F], _Utterance[F], int, int]] = []
        taken = {s.session_id: 0 for s in candidates}
        progress = True
        ready = {s.session_id: s.utterances[0].stream.ready() for s in candidates}
        while len(picks) < self.max_batch and progress:
            progress = False
            for s in candidates:
                utt = s.utterances[0]
                k = taken[s.session_id]
                if k >= ready[s.session_id] or len(picks) >= self.max_batch:
                    continue
                slot = s.ring.acquire()
                if slot is None:
                    continue
                picks.append((s, utt, slot, k))
                taken[s.session_id] = k + 1
                progress = True
        if not picks:
            return 0
        outs = [s.ring.view(slot) for s, _u, slot, _k in picks]
        started = time.perf_counter()
        try:
            # Features are pulled now, so they are computed from all the audio that has
            # arrived by the time these frames render: one call for every session.
            wanted = [(s.utterances[0].stream, n) for s in candidates if (n := taken[s.session_id])]
            pulled = {id(stream): iter(feats) for (stream, _n), feats in zip(wanted, self.engine.features(wanted), strict=True)}
            items = [
                RenderItem(s.avatar.name, s.avatar.idle_index(utt.start_cursor + utt.sent + k), next(pulled[id(utt.stream)]))
                for s, utt, _slot, k in picks
            ]
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
        for (s, utt, slot, k), item in zip(picks, items, strict=True):
            seq = utt.sent
            utt.sent += 1
            s.cursor = utt.start_cursor + utt.sent
            s.ring.publish(slot)
            # the utterance's features were all pulled above: only its newest frame can be its last
            last = utt.done and k == taken[s.session_id] - 1
            self.outbox.put(
                FrameReady(
                    s.session_id, utt.generation, utt.utterance_id, seq, slot,
                    item.avatar_index, utt.start_cursor + seq, utt.pcm.take(SAMPLES_PER_FRAME), last,
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
        for avatar in self.avatars.values():
            avatar.release()  # a process ending through multiprocessing runs no finalizers
        self.avatars.clear()

    def run(self, inbox: Queue[ToWorker]) -> None:
        parent = os.getppid()
        running = True
        while running:
            self.pass_started = time.monotonic()
            if os.getppid() != parent:
                # The server was killed without telling us: nobody will read our frames,
                # and exiting lets the server's resource tracker free its segments.
                log.warning("server process %d is gone; worker exiting", parent)
                return
            if self.has_work():
                timeout = FULL_WAIT_S
            else:
                timeout = 0.0 if self.jobs else IDLE_WAIT_S
            msg: ToWorker | None
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


def start_heartbeat(outbox: Outbox, busy_since: Callable[[], float], every_s: float = HEARTBEAT_EVERY_S) -> threading.Event:
    """Send ``Heartbeat`` every ``every_s`` from a daemon thread until the returned event is
    set. ``busy_since()`` is when the work in progress began (``time.monotonic()``)."""
    stop = threading.Event()
    pid = os.getpid()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                outbox.put(Heartbeat(pid, max(0.0, time.monotonic() - busy_since())))
            except (OSError, ValueError):  # the queue is closed: the process is ending
                return

    threading.Thread(target=beat, name="worker-heartbeat", daemon=True).start()
    return stop


def run_worker(config: WorkerConfig, inbox: Queue[ToWorker], outbox: Queue[FromWorker]) -> None:
    """Entry point of the worker process (started with spawn)."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s worker[%(process)d] %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    loop: WorkerLoop[Any] | None = None
    # Beats from before the engine loads: the server only holds the worker to them once it
    # is ready (until then its start timeout applies), but they tell it the process lives.
    stop_heartbeat = start_heartbeat(outbox, lambda: loop.pass_started if loop is not None else started)
    try:
        engine: LipSyncEngine[Any]
        try:
            engine = create_engine(config.engine, Path(config.data_dir), **config.engine_options)
        except (EngineUnavailable, ValueError) as exc:
            log.error("engine %s unavailable: %s", config.engine, exc)
            outbox.put(WorkerError("", f"engine {config.engine!r} unavailable: {exc}"))
            return
        loop = WorkerLoop(engine, Path(config.data_dir), outbox, config.max_batch)
        outbox.put(WorkerReady(engine.name, os.getpid(), loop.max_batch))
        try:
            loop.run(inbox)
        finally:
            loop.close()
    finally:
        stop_heartbeat.set()
