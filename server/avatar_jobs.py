"""Avatars as the HTTP API sees them: the listing of prepared avatars, and preparation jobs.

Preparing an avatar (decoding a clip, MediaPipe over every frame, JPEG encoding) is CPU
heavy; run on the server's event loop, or on a thread holding its GIL, it would starve
the live sessions' media. So each job runs in a process of its own (spawned, at a lower
priority), one at a time, with a small bounded queue behind it (full: 429). The child
reports its stages and progress over a pipe that the event loop reads when it is
readable (``add_reader``), so nothing blocks. Cancelling, a timeout and shutdown kill the
process and remove what it left half-written; a preparation that had already replaced
the avatar's folder when it was killed leaves the new one, never neither.

Finished jobs are kept for a while (``KEEP_FINISHED`` of them, ``KEEP_S`` seconds) for
status queries. The listing reads ``avatar.json`` and file sizes only (no frame is
decoded) and is cached per avatar until its files change.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import multiprocessing as mp
import os
import re
import secrets
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from avatars.avatar import AVATAR_NAME_RE, avatar_dir, avatars_root, list_avatars
from avatars.progress import Progress
from server.errors import Conflict, NotFound, TooManyRequests

log = logging.getLogger(__name__)

KEEP_FINISHED = 64  # finished jobs kept for status queries
KEEP_S = 3600.0  # and for at most this long
STATUS_URL = "/avatars/jobs/{job_id}"
PROGRESS_EVERY_S = 0.1  # the child sends at most this often (plus every stage change and the last step)
MUSETALK_DIR = "musetalk"  # pipeline/engines/musetalk/material.py: CACHE_DIR, under the avatar's folder
KILL_WAIT_S = 5.0
INNER_TMP_RE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # avatars.avatar._replace_file's, inside an avatar's folder


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


# ---- messages from the job's process ----------------------------------------------------


@dataclass(frozen=True)
class JobProgress:
    stage: str
    done: int = 0
    total: int = 0
    elapsed_s: float | None = None  # in this stage


@dataclass(frozen=True)
class JobFinished:
    frames: int
    action: str = "prepared"  # or what prepare() says it did (landmarks only, up to date)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobError:
    message: str


JobMessage = JobProgress | JobFinished | JobError


@dataclass(frozen=True)
class PrepareRequest:
    """What to prepare: ``source`` into avatar ``name``, with ``prepare_avatar``'s options."""

    name: str
    source: Path
    options: dict[str, float] = field(default_factory=dict)  # fps, max_seconds, max_side as given; the rest: prepare's defaults
    replace: bool = False
    source_name: str = ""  # as the client named it (an upload's file name)
    owns_source: bool = False  # an upload: deleted when the job ends


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds")


@dataclass
class AvatarJob:
    id: str
    request: PrepareRequest
    queued_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    stage: str = "queued"
    done: int = 0
    total: int = 0
    fps: float | None = None  # steps per second in the current stage
    error: str | None = None
    result: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()
    started_at: float | None = None
    finished_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str | None = None
    process: BaseProcess | None = None
    _stage_mark: tuple[float, int] = (0.0, 0)  # (monotonic time, done) when the stage began

    @property
    def status_url(self) -> str:
        return STATUS_URL.format(job_id=self.id)

    def progressed(self, msg: JobProgress) -> None:
        now = time.monotonic()
        if msg.stage != self.stage:
            self.stage, self._stage_mark, self.fps = msg.stage, (now, msg.done), None
        if msg.elapsed_s is not None:  # the stage's own clock
            self.fps = msg.done / msg.elapsed_s if msg.elapsed_s > 0 and msg.done > 0 else None
        else:
            began, done0 = self._stage_mark
            if now - began >= 0.2 and msg.done > done0:
                self.fps = (msg.done - done0) / (now - began)
        self.done, self.total = msg.done, msg.total

    def snapshot(self, queue_position: int | None = None) -> dict[str, Any]:
        fraction = min(1.0, self.done / self.total) if self.total > 0 else (1.0 if self.state == JobState.DONE else None)
        eta = (self.total - self.done) / self.fps if self.fps and self.total >= self.done else None
        end = self.finished_at or time.time()
        return {
            "job_id": self.id,
            "name": self.request.name,
            "state": self.state.value,
            "stage": self.stage,
            "progress": {"done": self.done, "total": self.total, "fraction": None if fraction is None else round(fraction, 4),
                         "fps": None if self.fps is None else round(self.fps, 2),
                         "eta_s": None if eta is None or self.state != JobState.RUNNING else round(eta, 1)},
            "error": self.error,
            "result": self.result,
            "warnings": list(self.warnings),
            "source": self.request.source_name or self.request.source.name,
            "replace": self.request.replace,
            "options": dict(self.request.options),
            "queue_position": queue_position,
            "queued_at": _iso(self.queued_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "elapsed_s": round(end - (self.started_at or self.queued_at), 2),
            "status_url": self.status_url,
        }


# ---- the listing ------------------------------------------------------------------------


class AvatarCatalog:
    """Listing entries of prepared avatars, each cached until its files change."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._cache: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}

    def names(self) -> list[str]:
        return list_avatars(self.data_dir)

    def entries(self) -> list[dict[str, Any]]:
        names = self.names()
        for gone in set(self._cache) - set(names):
            del self._cache[gone]
        return [entry for name in names if (entry := self.entry(name)) is not None]

    def entry(self, name: str) -> dict[str, Any] | None:
        """The avatar's listing entry, or None when it is not prepared."""
        if not AVATAR_NAME_RE.fullmatch(name):
            return None
        folder = avatar_dir(self.data_dir, name)
        try:
            key = _change_key(folder)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
            entry = _entry(folder, name)
        except (OSError, ValueError) as exc:  # gone meanwhile, or a broken avatar.json: not listed
            log.debug("avatar %s not listed: %s", name, exc)
            self._cache.pop(name, None)
            return None
        self._cache[name] = (key, entry)
        return entry


def _change_key(folder: Path) -> tuple[int, ...]:
    """Changes whenever the avatar is re-prepared (a new folder, a rewritten avatar.json) or
    engine material is added to it."""
    info = (folder / "avatar.json").stat()
    key = [folder.stat().st_ino, info.st_ino, info.st_size, info.st_mtime_ns]
    with contextlib.suppress(OSError):
        key.append((folder / MUSETALK_DIR).stat().st_mtime_ns)
    return tuple(key)


def _entry(folder: Path, name: str) -> dict[str, Any]:
    meta = json.loads((folder / "avatar.json").read_text())
    if not isinstance(meta, dict):
        raise ValueError("avatar.json is not an object")
    fps = int(meta.get("fps", 25)) or 25
    frames = int(meta.get("num_frames", 0))
    musetalk = _musetalk_material(folder / MUSETALK_DIR)
    return {
        "name": name,
        "width": int(meta.get("width", 0)),
        "height": int(meta.get("height", 0)),
        "fps": fps,
        "frames": frames,
        "seconds": round(frames / fps, 3),
        "bytes": _folder_bytes(folder),
        "kind": meta.get("kind"),
        "source": meta.get("source"),
        "builder": meta.get("builder"),
        "format": meta.get("format"),
        "clips": _clips(meta.get("clips")),
        "engines": {"cpu": True, "musetalk": bool(musetalk)},  # the cpu engine needs nothing prepared
        "material": {"musetalk": musetalk},
        "prepared_at": _iso((folder / "avatar.json").stat().st_mtime),
    }


def _clips(raw: Any) -> list[dict[str, Any]]:
    """The action clips as avatar.json lists them (``avatars.clips``): the number
    ``/set_audiotype`` plays each by (LiveTalking's, from 2), its name, length, sound, loop."""
    if not isinstance(raw, list):
        return []
    out: list[dict[str, Any]] = []
    for clip in raw:
        if isinstance(clip, dict) and isinstance(clip.get("number"), int) and isinstance(clip.get("name"), str):
            out.append({k: clip[k] for k in ("number", "name", "frames", "seconds", "has_audio", "loop") if k in clip})
    return out


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def _musetalk_material(root: Path) -> list[dict[str, Any]]:
    """MuseTalk material cached under the avatar (one folder per parameter set, with its
    params.json); what built it and how large it is."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for folder in sorted(root.iterdir()):
            params_file = folder / "params.json"
            if not folder.is_dir() or folder.name.endswith(".tmp") or not params_file.is_file():
                continue
            try:
                params = json.loads(params_file.read_text())
            except (OSError, ValueError):
                continue
            out.append({"key": folder.name, "version": params.get("version"), "mask_source": params.get("mask_source"),
                        "latent_dtype": params.get("latent_dtype"), "bytes": _folder_bytes(folder)})
    return out


# ---- the job's process ----------------------------------------------------------------


@dataclass(frozen=True)
class ChildArgs:
    data_dir: str
    request: PrepareRequest
    job_id: str
    log_level: int


def run_job(conn: Connection, args: ChildArgs) -> None:
    """The job's process: prepare the avatar, report progress and the outcome on ``conn``."""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s avatar-job {args.job_id} %(name)s: %(message)s")
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # behind the server's live sessions for the CPU
    req = args.request
    sent_at, sent_stage = 0.0, ""

    def progress(p: Progress) -> None:
        nonlocal sent_at, sent_stage
        now = time.monotonic()
        if p.stage != sent_stage or p.done >= p.total or now - sent_at >= PROGRESS_EVERY_S:
            sent_at, sent_stage = now, p.stage
            conn.send(JobProgress(p.stage, p.done, p.total, p.elapsed_s))

    try:
        conn.send(JobProgress("starting"))
        from avatars.prepare import prepare  # MediaPipe and PyAV: only this process needs them

        given: dict[str, Any] = {k: int(v) if k in ("fps", "max_side") else v for k, v in req.options.items()}
        result = prepare(Path(args.data_dir), req.name, req.source, **given, replace=req.replace, progress=progress)
        avatar = result.avatar
        conn.send(JobFinished(avatar.num_frames, result.action.lower(), tuple(result.warnings)))
    except (ValueError, LookupError, FileNotFoundError, FileExistsError) as exc:  # the input's fault: the message says why
        conn.send(JobError(str(exc) or type(exc).__name__))
    except MemoryError:
        conn.send(JobError("ran out of memory: send a shorter clip, or a smaller max_side / max_seconds"))
    except Exception as exc:
        log.exception("preparing avatar %s failed", req.name)
        conn.send(JobError(f"internal error ({type(exc).__name__}: {exc}); the server log has the details"))
    finally:
        conn.close()


def remove_partial(data_dir: Path, name: str) -> None:
    """What a killed preparation of ``name`` left: its temporary folders and files
    (``save_avatar`` writes ``.NAME.XXXXXXXX.tmp``, ``_publish`` moves the old one to
    ``.NAME.XXXXXXXX.old``, long clips are decoded into ``.NAME.XXXXXXXX.frames.tmp``, files
    replaced in place are written as ``.FILE.XXXXXXXX.tmp`` inside the avatar's folder). When it
    died between moving the old avatar aside and renaming the new one in, the old one goes back."""
    root = avatars_root(data_dir)
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old|frames\.tmp)")
    final = avatar_dir(data_dir, name)
    try:
        leftovers = [p for p in root.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return
    for path in leftovers:
        if path.name.endswith(".old") and not final.exists() and (path / "avatar.json").is_file():
            with contextlib.suppress(OSError):
                path.rename(final)
                log.info("avatar %s: put the previous version back after an interrupted preparation", name)
                continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        for path in final.iterdir() if final.is_dir() else ():
            if INNER_TMP_RE.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _as_client_named(message: str, request: PrepareRequest) -> str:
    """``message`` with an upload's temporary file called by the name the client gave it."""
    if not request.owns_source or not request.source_name:
        return message
    return message.replace(str(request.source), request.source_name).replace(request.source.name, request.source_name)


# ---- the jobs ---------------------------------------------------------------------------


class AvatarJobs:
    """Preparation jobs: one runs at a time in its own process, at most ``max_jobs`` are
    queued or running. ``on_done(name)`` is called when an avatar was (re)prepared."""

    def __init__(self, data_dir: Path, max_jobs: int = 4, timeout_s: float = 900.0,
                 on_done: Callable[[str], None] | None = None, log_level: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.max_jobs = max(1, max_jobs)
        self.timeout_s = timeout_s
        self.on_done = on_done
        self.log_level = logging.getLogger().level if log_level is None else log_level
        self.catalog = AvatarCatalog(self.data_dir)
        self._jobs: OrderedDict[str, AvatarJob] = OrderedDict()
        self._queue: deque[AvatarJob] = deque()
        self._running: AvatarJob | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._ctx = mp.get_context("spawn")  # never fork a process with an event loop and threads

    # ---- queries ----
    def get(self, job_id: str) -> AvatarJob:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no avatar job {job_id!r} (finished jobs are kept for {KEEP_S / 3600:.0f} h, the last "
                           f"{KEEP_FINISHED} of them); GET /avatars lists the avatars")
        return job

    def pending(self, name: str) -> AvatarJob | None:
        """The queued or running job preparing ``name``, if any."""
        return next((j for j in self._jobs.values() if j.request.name == name and j.state not in ENDED), None)

    def last(self, name: str) -> AvatarJob | None:
        """The most recent job for ``name`` still kept."""
        return next((j for j in reversed(self._jobs.values()) if j.request.name == name), None)

    def active(self) -> list[AvatarJob]:
        return [j for j in self._jobs.values() if j.state not in ENDED]

    def snapshot(self, job: AvatarJob) -> dict[str, Any]:
        position = next((k for k, queued in enumerate(self._queue) if queued is job), None)
        return job.snapshot(None if position is None else position + (self._running is not None))

    # ---- changes ----
    def submit(self, request: PrepareRequest) -> AvatarJob:
        """Queue a job; 409 when ``name`` is being prepared already, 429 when the queue is full."""
        self._expire()
        if self._closed:
            raise Conflict("the server is shutting down; send the job again once it is back")
        busy = self.pending(request.name)
        if busy is not None:
            raise Conflict(f"avatar {request.name!r} is being prepared already (job {busy.id}, {busy.state.value}): wait for "
                           f"it (GET {busy.status_url}) or cancel it (DELETE {busy.status_url})")
        if len(self.active()) >= self.max_jobs:
            raise TooManyRequests(f"{self.max_jobs} avatar preparations are queued or running (--max-avatar-jobs): "
                                  "try again when one has finished")
        job = AvatarJob(secrets.token_hex(8), request)
        self._jobs[job.id] = job
        self._queue.append(job)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run_queue())
        log.info("avatar job %s: prepare %r from %s (queued behind %d)", job.id, request.name,
                 request.source_name or request.source.name, len(self._queue) - 1 + (self._running is not None))
        return job

    async def cancel(self, job_id: str, reason: str = "cancelled by request", wait_s: float = KILL_WAIT_S) -> AvatarJob:
        """Cancel a queued or running job; a running one is killed and its partial avatar removed
        before this returns (within ``wait_s``). 409 when it has ended already."""
        job = self.get(job_id)
        if job.state in ENDED:
            raise Conflict(f"avatar job {job.id} has already ended ({job.state.value}): nothing to cancel")
        self._cancel(job, reason)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.ended.wait(), wait_s)
        return job

    def _cancel(self, job: AvatarJob, reason: str) -> None:
        if job.state == JobState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            self._end(job, JobState.CANCELLED, reason)
            return
        job.cancel_reason = reason
        if job.process is not None and job.process.is_alive():
            job.process.kill()  # the pipe then ends, and the runner cleans up

    async def wait(self, job: AvatarJob) -> AvatarJob:
        await job.ended.wait()
        return job

    async def close(self) -> None:
        """Shutdown: cancel what is queued, kill what runs, and wait for its cleanup (briefly)."""
        self._closed = True
        for job in list(self._queue):
            self._cancel(job, "the server is shutting down; send the job again once it is back")
        if self._running is not None:
            self._cancel(self._running, "the server is shutting down; send the job again once it is back")
        if self._runner is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._runner), KILL_WAIT_S)
            self._runner.cancel()

    # ---- running ----
    async def _run_queue(self) -> None:
        while self._queue and not self._closed:
            job = self._queue.popleft()
            self._running = job
            try:
                await self._run(job)
            except Exception as exc:  # a bug here must not leave the job "running" for ever
                log.exception("avatar job %s failed", job.id)
                self._end(job, JobState.FAILED, f"internal error ({type(exc).__name__}); the server log has the details")
            finally:
                self._running = None
        while self._queue:  # closed meanwhile
            self._end(self._queue.popleft(), JobState.CANCELLED, "the server is shutting down")

    async def _run(self, job: AvatarJob) -> None:
        loop = asyncio.get_running_loop()
        job.state, job.started_at, job.stage = JobState.RUNNING, time.time(), "starting"
        receiver, sender = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=run_job, name=f"avatar-job-{job.id}", daemon=True,
                                    args=(sender, ChildArgs(str(self.data_dir), job.request, job.id, self.log_level)))
        outcome: list[JobMessage] = []
        finished: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            try:
                while receiver.poll():
                    msg = receiver.recv()
                    if isinstance(msg, JobProgress):
                        job.progressed(msg)
                    elif isinstance(msg, (JobFinished, JobError)):
                        outcome.append(msg)
            except (EOFError, OSError):  # the process ended (or was killed): its end of the pipe closed
                loop.remove_reader(receiver.fileno())
                if not finished.done():
                    finished.set_result(None)

        try:
            try:
                await loop.run_in_executor(None, process.start)  # spawning takes a moment: off the loop
            finally:
                sender.close()  # ours: the pipe ends when the child's copy closes
            job.process = process
            if job.cancel_reason is not None:  # cancelled while it was starting
                process.kill()
            loop.add_reader(receiver.fileno(), readable)
            try:
                await asyncio.wait_for(asyncio.shield(finished), self.timeout_s)
            except asyncio.TimeoutError:
                job.error = (f"took longer than {self.timeout_s:.0f} s (--job-timeout-s) and was stopped: send a shorter "
                             "clip or a smaller max_side")
                process.kill()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(finished, KILL_WAIT_S)
            await loop.run_in_executor(None, process.join, KILL_WAIT_S)
            if process.is_alive():
                process.kill()
        finally:
            if process.is_alive():  # cancelled (shutdown) or failed midway: the process must not outlive the job
                process.kill()
            with contextlib.suppress(Exception):
                loop.remove_reader(receiver.fileno())
            receiver.close()
        self._finish(job, outcome[-1] if outcome else None, process.exitcode)

    def _finish(self, job: AvatarJob, outcome: JobMessage | None, exitcode: int | None) -> None:
        name = job.request.name
        if isinstance(outcome, JobFinished):  # published, even if a kill came right after
            job.result, job.warnings = self.catalog.entry(name), outcome.warnings
            if self.on_done is not None:
                try:
                    self.on_done(name)
                except Exception:  # the avatar is prepared; sessions opened later still get it
                    log.exception("avatar job %s: could not announce the new avatar %s", job.id, name)
            self._end(job, JobState.DONE)
            return
        remove_partial(self.data_dir, name)
        if job.error is not None:  # timed out
            self._end(job, JobState.FAILED, job.error)
        elif job.cancel_reason is not None:
            self._end(job, JobState.CANCELLED, job.cancel_reason)
        elif isinstance(outcome, JobError):
            self._end(job, JobState.FAILED, _as_client_named(outcome.message, job.request))
        else:
            self._end(job, JobState.FAILED, f"the preparation process ended without a result (exit code {exitcode}); "
                                            "the server log has the details")

    def _end(self, job: AvatarJob, state: JobState, error: str | None = None) -> None:
        job.state, job.finished_at = state, time.time()
        job.error = error if state != JobState.DONE else None
        job.process, job.stage = None, state.value
        if job.request.owns_source:
            job.request.source.unlink(missing_ok=True)
        job.ended.set()
        level = logging.INFO if state == JobState.DONE else logging.WARNING
        log.log(level, "avatar job %s (%s): %s%s", job.id, job.request.name, state.value, f": {error}" if error else "")

    def _expire(self) -> None:
        now = time.time()
        ended = [j for j in self._jobs.values() if j.state in ENDED]
        for k, job in enumerate(ended):
            if len(ended) - k > KEEP_FINISHED or now - (job.finished_at or now) > KEEP_S:
                del self._jobs[job.id]
