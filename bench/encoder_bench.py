"""Video encoding cost per session and how it scales across cores, through aiortc's own
encoders (``aiortc.codecs.get_encoder``), at the default avatar's 512x512 and at 1280x720.

Each simulated session does per frame what a real one does in the server: the event loop
builds the ``av.VideoFrame`` from the OpenCV I420 the player made (``server.frames``), awaits
``loop.run_in_executor(None, encoder.encode, frame, False)`` exactly as aiortc's
``RTCRtpSender._next_encoded_frame`` does, then, back on the loop, turns the payloads into
RTP packets and SRTP-protects them as ``RTCRtpSender._run_rtp`` and
``RTCDtlsTransport._send_rtp`` do (only the UDP send is left out). Sessions run unpaced, as
fast as they can, so frames/s is capacity: that many sessions in one event loop (one server
process: aiortc's default executor, one GIL), against one session in each of that many
processes (no shared GIL or loop), the ceiling one process is held to. Last, sessions paced
at 25 fps as ``AvatarVideoTrack`` paces them check how many one process really keeps on this
machine against the number its cores and the CPU per frame predict.

Run: ``python -m bench encode``.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import clock
from aiortc.codecs import CODECS, HEADER_EXTENSIONS, get_encoder
from aiortc.codecs.base import Encoder
from aiortc.rtcdtlstransport import SRTP_PROFILES
from aiortc.rtcrtpparameters import RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket
from pylibsrtp import Policy, Session

from avatars.avatar import load_avatar
from avatars.default import ensure_default_avatar
from bench.cpu_engine_bench import widen
from bench.table import print_table
from media.pcm import SILENT_FRAME
from media.timing import FPS, FRAME_S, VIDEO_TICKS_PER_FRAME, VIDEO_TIME_BASE
from server.frames import I420, MediaFrame, to_i420, to_video_frame
from server.tracks import MAX_LATE_S

MIMES = {"VP8": "video/VP8", "H.264": "video/H264"}
SIZES = ("512x512", "1280x720")
WARMUP = 10  # frames each encoder gets before timing: the first is a keyframe


def cpu_s() -> float:
    """CPU seconds of this whole process: the encoders' own threads included."""
    return time.process_time()


def machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used (Linux), to tell how much of the
    run other programs took: their load skews every figure here."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def native_threads() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux
        return None


def load_frames(data_dir: Path, size: str) -> list[I420]:
    """The default avatar's idle clip (512x512), or the same centred on a 1280x720 canvas
    as ``python -m bench cpu`` renders it, in I420 made by OpenCV as the player makes it."""
    avatar = ensure_default_avatar(data_dir)
    if size == "1280x720":
        try:
            avatar = load_avatar(data_dir, "bench720")
        except LookupError:
            avatar = widen(avatar, data_dir)
    out = []
    for image in avatar.frames:
        yuv = to_i420(np.asarray(image))
        assert yuv is not None
        out.append(yuv)
    return out


def video_frame(frames: list[I420], n: int) -> av.VideoFrame:
    """What ``AvatarVideoTrack.recv`` hands aiortc for frame ``n``."""
    yuv = frames[n % len(frames)]
    frame = to_video_frame(MediaFrame(n, np.empty((0, 0, 3), np.uint8), SILENT_FRAME, None, yuv))
    frame.pts = n * VIDEO_TICKS_PER_FRAME
    frame.time_base = VIDEO_TIME_BASE
    return frame


def new_encoder(codec: str) -> Encoder:
    params = next(c for c in CODECS["video"] if c.mimeType == MIMES[codec])
    return get_encoder(params)


class RtpSide:
    """The per-packet work ``RTCRtpSender._run_rtp`` and ``RTCDtlsTransport._send_rtp`` do
    on the event loop: RTP header with mid and abs-send-time, serialize, SRTP protect."""

    def __init__(self) -> None:
        profile = SRTP_PROFILES[0]  # aiortc's first choice, what a browser negotiates
        key = os.urandom(profile.key_length + profile.salt_length)
        self.srtp = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile.libsrtp_profile))
        self.extensions = HeaderExtensionsMap()
        self.extensions.configure(RTCRtpParameters(headerExtensions=HEADER_EXTENSIONS["video"]))
        self.seq = 0
        self.bytes = 0

    def send(self, payloads: list[bytes], timestamp: int) -> None:
        for i, payload in enumerate(payloads):
            packet = RtpPacket(payload_type=96, sequence_number=self.seq, timestamp=timestamp)
            packet.ssrc = 0x1234
            packet.payload = payload
            packet.marker = 1 if i == len(payloads) - 1 else 0
            packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
            packet.extensions.mid = "1"
            self.bytes += len(self.srtp.protect(packet.serialize(self.extensions)))
            self.seq = (self.seq + 1) & 0xFFFF


@dataclass
class Run:
    frames: int
    wall_s: float
    cpu_s: float  # the process's CPU time over the run
    loop_cpu_s: float  # the event loop thread's share of it
    start: float  # perf_counter (system-wide monotonic on Linux): processes line up
    end: float
    kbps: float
    other_cores: float = 0.0  # what other programs on the machine used meanwhile

    @property
    def fps(self) -> float:
        return self.frames / self.wall_s

    @property
    def idle_cores(self) -> float:
        """Cores neither this run nor other programs used: what waiting (for the GIL, the
        event loop or a thread handoff) left unused."""
        return max(0.0, (os.cpu_count() or 1) - self.cpu_s / self.wall_s - self.other_cores)


class OtherLoad:
    """Cores that programs other than this benchmark use over a stretch of time (Linux;
    0 elsewhere): they skew every figure, so runs wait for a quiet machine and say how
    quiet it was."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), machine_busy_s(), cpu_s()

    def cores(self, own_cpu_s: float | None = None) -> float:
        busy = machine_busy_s()
        if busy is None or self.busy is None:
            return 0.0
        own = cpu_s() - self.own if own_cpu_s is None else own_cpu_s
        return max(0.0, busy - self.busy - own) / max(1e-6, time.perf_counter() - self.t)


def wait_quiet(limit_s: float, threshold: float = 0.15) -> None:
    """Wait, at most ``limit_s``, until other programs use under ``threshold`` cores."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        load = OtherLoad()
        time.sleep(0.5)
        if load.cores() < threshold:
            return


async def _session(codec: str, frames: list[I420], count: int, go: asyncio.Event, ready: Callable[[], None], rtp: RtpSide) -> None:
    loop = asyncio.get_running_loop()
    encoder = new_encoder(codec)
    for n in range(WARMUP + count):
        if n == WARMUP:
            ready()
            await go.wait()
        frame = video_frame(frames, n)
        payloads, timestamp = await loop.run_in_executor(None, encoder.encode, frame, False)
        rtp.send(payloads, timestamp)


async def _sessions(codec: str, frames: list[I420], sessions: int, count: int, at_start: Callable[[], object] | None) -> Run:
    go = asyncio.Event()
    waiting = [sessions]

    def ready() -> None:
        waiting[0] -= 1
        if not waiting[0]:
            if at_start is not None:
                at_start()  # blocks the loop, which has nothing else to do: every session waits for go
            go.set()

    rtps = [RtpSide() for _ in range(sessions)]
    tasks = [asyncio.ensure_future(_session(codec, frames, count, go, ready, r)) for r in rtps]
    await go.wait()
    bytes0 = sum(r.bytes for r in rtps)
    load = OtherLoad()
    t0, c0, l0 = time.perf_counter(), cpu_s(), time.thread_time()
    await asyncio.gather(*tasks)
    t1, c1, l1 = time.perf_counter(), cpu_s(), time.thread_time()
    kbps = (sum(r.bytes for r in rtps) - bytes0) * 8 * FPS / (sessions * count) / 1000
    return Run(sessions * count, t1 - t0, c1 - c0, l1 - l0, t0, t1, kbps, load.cores())


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # the server's loop where installed
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_threads(codec: str, frames: list[I420], sessions: int, count: int, at_start: Callable[[], object] | None = None) -> Run:
    """``sessions`` sessions in one event loop, their encoders in its default executor;
    ``at_start`` is called once all are warm, just before the timed frames."""
    loop = new_loop()
    try:
        return loop.run_until_complete(_sessions(codec, frames, sessions, count, at_start))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _process_main(codec: str, data_dir: str, size: str, count: int, barrier: Any, results: Any, done: Any) -> None:
    frames = load_frames(Path(data_dir), size)
    results.put(run_threads(codec, frames, 1, count, partial(barrier.wait, 600)))  # all start together, warm
    done.wait(600)  # exit (and spend CPU on it) only once every process has finished its run


def run_processes(codec: str, data_dir: Path, size: str, processes: int, count: int) -> Run:
    """One session in each of ``processes`` processes, started together."""
    ctx = mp.get_context("spawn")  # no fork of a process that holds encoder threads
    barrier, results, done = ctx.Barrier(processes + 1), ctx.Queue(), ctx.Event()
    args = (codec, str(data_dir), size, count, barrier, results, done)
    procs = [ctx.Process(target=_process_main, args=args) for _ in range(processes)]
    for p in procs:
        p.start()
    barrier.wait(timeout=600)
    load = OtherLoad()
    runs: list[Run] = []
    while len(runs) < processes:
        try:
            runs.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode for p in procs):
                done.set()
                raise RuntimeError("a benchmark process failed") from None
    other = load.cores(sum(r.cpu_s for r in runs))
    done.set()
    for p in procs:
        p.join()
    start, end = min(r.start for r in runs), max(r.end for r in runs)
    return Run(
        sum(r.frames for r in runs), end - start, sum(r.cpu_s for r in runs), sum(r.loop_cpu_s for r in runs), start, end,
        statistics.fmean(r.kbps for r in runs), other,
    )


@dataclass
class Paced:
    sent: int = 0
    skipped: int = 0


async def _paced_session(codec: str, frames: list[I420], seconds: float, phase: float, go: asyncio.Future[float], out: Paced) -> None:
    """One session at 25 fps as ``AvatarVideoTrack`` paces it: a frame every 40 ms, and a
    skip to the present when the encoder has fallen more than ``MAX_LATE_S`` behind."""
    loop = asyncio.get_running_loop()
    encoder, rtp = new_encoder(codec), RtpSide()
    for n in range(3):  # the first frame is a keyframe, and opens the codec
        rtp.send(*await loop.run_in_executor(None, encoder.encode, video_frame(frames, n), False))
    t0 = await go + phase
    n = 0
    while n * FRAME_S < seconds:
        await asyncio.sleep(t0 + n * FRAME_S - loop.time())
        late = int((loop.time() - t0) / FRAME_S) - n
        if late * FRAME_S > MAX_LATE_S:
            out.skipped += late
            n += late
        rtp.send(*await loop.run_in_executor(None, encoder.encode, video_frame(frames, n), False))
        out.sent += 1
        n += 1


def paced_kept(codec: str, frames: list[I420], sessions: int, seconds: float) -> tuple[float, float]:
    """The share of frames ``sessions`` paced sessions in one process send (not skip), and
    the cores other programs used meanwhile."""

    async def main() -> tuple[float, float]:
        go: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        outs = [Paced() for _ in range(sessions)]
        tasks = [asyncio.ensure_future(_paced_session(codec, frames, seconds, i * FRAME_S / sessions, go, o)) for i, o in enumerate(outs)]
        await asyncio.sleep(0.5 + 0.05 * sessions)  # every encoder open and warm
        load = OtherLoad()
        go.set_result(asyncio.get_running_loop().time() + 0.1)
        await asyncio.gather(*tasks)
        sent = sum(o.sent for o in outs)
        return sent / max(1, sent + sum(o.skipped for o in outs)), load.cores()

    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def paced_capacity(codec: str, frames: list[I420], predicted: float, seconds: float, quiet_s: float) -> tuple[int, float]:
    """The most paced sessions one process keeps at 25 fps here (99% of frames sent in one
    of two tries: the machine's neighbours can spoil one), searched from ``predicted`` in
    steps of a tenth; and the most cores other programs used in the runs that decided it."""
    others: list[float] = []

    def keeps(sessions: int) -> bool:
        for _ in range(2):
            wait_quiet(quiet_s)
            kept, other = paced_kept(codec, frames, sessions, seconds)
            others.append(other)
            if kept >= 0.99:
                return True
        return False

    step = max(1, round(predicted * 0.1))
    sessions, most = max(1, round(predicted)), 0
    while 1 <= sessions <= 2 * predicted + 2:
        if keeps(sessions):
            most = sessions
            sessions += step
        elif most:
            break
        else:
            sessions -= step
    return most, max(others, default=0.0)


def encode_ms(codec: str, frames: list[I420], count: int) -> tuple[float, str]:
    """Median wall ms of ``encoder.encode`` alone, one session, no other load; and the
    native threads the encoder added to the process (its own worker threads)."""
    encoder = new_encoder(codec)
    before = native_threads()
    times = []
    for n in range(WARMUP + count):
        frame = video_frame(frames, n)
        t = time.perf_counter()
        encoder.encode(frame, False)
        if n >= WARMUP:
            times.append(time.perf_counter() - t)
    after = native_threads()
    threads = "?" if before is None or after is None else str(1 + after - before)
    return statistics.median(times) * 1000, threads


def best(measure: Callable[[], Run], repeats: int, quiet_s: float) -> Run:
    """The fastest of ``repeats`` runs, each started on a machine as quiet as ``quiet_s``
    of waiting allows: other programs only ever slow a run down."""
    runs = []
    for _ in range(repeats):
        wait_quiet(quiet_s)
        runs.append(measure())
    return max(runs, key=lambda r: r.fps)


def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-bench-"))
    workers, reps, quiet = args.workers, args.repeats, args.quiet_wait
    rows: list[list[str]] = []
    others: list[float] = []  # cores other programs used in each run that counts
    for size in SIZES:
        frames = load_frames(data_dir, size)
        for codec in MIMES:
            wait_quiet(quiet)
            ms, threads = encode_ms(codec, frames, 100)
            count = args.frames or max(100, round(args.seconds * 1000 / ms))  # runs long enough to average out
            one = best(partial(run_threads, codec, frames, 1, count), reps, quiet)
            par = best(partial(run_threads, codec, frames, workers, count), reps, quiet)
            procs = best(partial(run_processes, codec, data_dir, size, workers, count), reps, quiet)
            others += [one.other_cores, par.other_cores, procs.other_cores]
            cpu_ms = par.cpu_s * 1000 / par.frames
            predicted = (os.cpu_count() or 1) * 1000 / (FPS * cpu_ms)
            kept = None
            if args.paced_seconds > 0:
                kept, other = paced_capacity(codec, frames, predicted, args.paced_seconds, quiet)
                others.append(other)
            rows.append([
                codec, size, threads, f"{ms:.2f}", f"{cpu_ms:.2f}", f"{par.loop_cpu_s * 1000 / par.frames:.2f}",
                f"{one.kbps:.0f}", f"{one.fps:.0f}", f"{par.fps:.0f}", f"{par.fps / (workers * one.fps):.0%}", f"{procs.fps:.0f}",
                f"{par.fps / procs.fps:.0%}", f"{par.idle_cores:.2f} / {procs.idle_cores:.2f}", f"{1000 / (FPS * cpu_ms):.1f}",
                f"{predicted:.0f}" if kept is None else f"{predicted:.0f} / {kept}",
            ])
    length = f"{args.frames} frames a session" if args.frames else f"~{args.seconds:g} s a run"
    print_table(
        f"aiortc video encoding per session, {os.cpu_count()} cores, {length}, best of {reps}. "
        f"Sessions an N-core machine can encode at {FPS} fps, apart from inference: N x '{FPS} fps sessions/core'",
        [
            "codec", "frame size", "encoder threads", "encode ms (1 session)", f"CPU ms/frame ({workers} sessions)",
            "event-loop ms/frame", "kbit/s", "frames/s 1 session", f"frames/s {workers} sessions, 1 process", "parallel efficiency",
            f"frames/s {workers} processes", "threads / processes", "cores idle: 1 process / processes", f"{FPS} fps sessions/core",
            f"sessions here: predicted / kept at {FPS} fps",
        ],
        rows,
    )
    print(
        f"\n{FPS} fps sessions/core = 1000 / ({FPS} x CPU ms/frame), the whole process's CPU per frame with {workers} sessions in"
        f" one process: encoder and its threads, frame conversion, RTP and SRTP. Parallel efficiency = frames/s with {workers}"
        f" sessions / ({workers} x frames/s with 1); where one session's encoder already uses more than one core (x264's own"
        " threads) it is bounded by the cores left, and threads / processes (one process sharing a GIL and an event loop,"
        " against one process a session) is what the GIL costs; cores idle = cores neither the run nor other programs used"
        " (meaningful when sessions >= cores). The event loop does every session's Python work on one core:"
        f" one process serves at most 1000 / ({FPS} x event-loop ms/frame) video sessions, fewer with audio. Sessions here:"
        f" predicted = {os.cpu_count()} cores x sessions/core; kept = the most sessions one process ran here paced as the"
        " video track paces them (a frame every 40 ms, skipping when 80 ms behind) with at least 99% of frames sent."
    )
    other = max(others)
    print(f"Other programs on this machine used at most {other:.2f} cores during the runs counted" + (
        ": the figures above are skewed; rerun on a quiet machine." if other > 0.1 else "."))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=2.0, help="about how long each run lasts")
    p.add_argument("--frames", type=int, default=None, help="timed frames per session (instead of --seconds)")
    p.add_argument("--workers", type=int, default=2, help="sessions in parallel (threads in one process, or processes)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each parallel figure; the best counts")
    p.add_argument("--paced-seconds", type=float, default=3.0, help="length of each paced-capacity run (0: skip that search)")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="seconds each run may wait for other programs to go quiet")
    p.add_argument("--data-dir", default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench encode")
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
