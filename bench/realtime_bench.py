"""Real-time figures measured at a WebRTC client (aiortc) on this machine.

* text -> first speaking audio / first speaking video frame at the client
* interrupt -> silence at the client
* A/V offset at the client: by arrival, and by content (mouth opening vs the envelope)
* how many sessions speak at once at 25 fps without dropped frames

Run: ``python -m bench realtime`` (starts its own server with the CPU engine).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.table import print_table
from tests.support.client import AvatarClient, Received
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)

SILENT = 0.01
SHORT = "Hello, how are you today?"
LONG = " ".join(["This sentence goes on for a while so that several sessions speak together."] * 3)


def _audio_events(received: Received, packets: bool = False) -> list[tuple[float, float, float]]:
    """(arrival, media seconds, rms) per audio frame: decoded by the receiver (after its
    playout buffer) or, with ``packets``, as each RTP packet arrived."""
    if packets:
        return [(p.t, p.pts / 48_000, p.rms) for p in received.audio_packets]
    return [(a.t, a.pts / a.rate, float(np.sqrt(np.mean(a.samples**2)))) for a in received.audio]


def first_speech(received: Received, after: float, packets: bool = False) -> tuple[float, float] | None:
    """Arrival time and media time of the first speaking audio that arrived after ``after``."""
    for t, media, rms in _audio_events(received, packets):
        if t >= after and rms > SILENT:
            return t, media
    return None


def silence_after(received: Received, asked: float, packets: bool = False) -> float | None:
    """Arrival of the first silent audio after ``asked`` that stays silent (5 frames)."""
    events = [e for e in _audio_events(received, packets) if e[0] >= asked]
    for k, (t, _media, rms) in enumerate(events):
        if rms <= SILENT and all(r <= SILENT for _t, _m, r in events[k : k + 5]):
            return t
    return None


def video_arrival_at(received: Received, media: float, packets: bool = False) -> float | None:
    """Arrival of the video frame that shows media time ``media``: decoded, or with
    ``packets`` complete on the wire (its last packet)."""
    frames = received.video_packets if packets else received.video
    for v in frames:
        if v.pts / 90_000 >= media - 0.02:
            return v.t
    return None


def steady_offset(received: Received, packets: bool) -> float:
    """Median over the whole stream of (video arrival - audio arrival) for the same media
    time, in ms: the constant A/V offset a client that plays on arrival would see."""
    if packets:
        v = [x.t - x.pts / 90_000 for x in received.video_packets[25:]]
        a = [x.t - x.pts / 48_000 for x in received.audio_packets[50:]]
    else:
        v = [x.t - x.pts / 90_000 for x in received.video[25:]]
        a = [x.t - x.pts / x.rate for x in received.audio[50:]]
    return (statistics.median(v) - statistics.median(a)) * 1000 if v and a else float("nan")


async def measure_latency(url: str, trials: int) -> dict[str, list[float]]:
    keys = ["audio_pkt", "audio", "video_pkt", "video", "offset_pkt", "offset", "silence_pkt", "silence"]
    out: dict[str, list[float]] = {k: [] for k in keys}
    async with AvatarClient(url, keep_images=False, tap_packets=True) as client:
        await client.connect()
        await asyncio.sleep(1.0)
        for _ in range(trials):
            sent = time.monotonic()
            await client.say(SHORT)
            await client.wait_speaking(False, timeout=20)
            await asyncio.sleep(0.3)
            pkt, dec = first_speech(client.received, sent, True), first_speech(client.received, sent)
            if pkt is None or dec is None:
                continue
            out["audio_pkt"].append((pkt[0] - sent) * 1000)
            out["audio"].append((dec[0] - sent) * 1000)
            t_video_pkt = video_arrival_at(client.received, pkt[1], packets=True)
            t_video = video_arrival_at(client.received, pkt[1])
            if t_video is not None and t_video_pkt is not None:
                out["video_pkt"].append((t_video_pkt - sent) * 1000)
                out["video"].append((t_video - sent) * 1000)
        for _ in range(trials):
            await client.say(LONG)
            await client.wait_speaking(True, timeout=10)
            await asyncio.sleep(1.0)
            asked = time.monotonic()
            await client.interrupt()
            await asyncio.sleep(0.6)
            for key, packets in (("silence_pkt", True), ("silence", False)):
                t = silence_after(client.received, asked, packets)
                if t is not None:
                    out[key].append((t - asked) * 1000)
        out["offset_pkt"].append(steady_offset(client.received, packets=True))
        out["offset"].append(steady_offset(client.received, packets=False))
    return out


async def measure_sync(url: str) -> tuple[float, int]:
    """Correlation of mouth opening (independent face mesh on received frames) with the
    speech envelope, and the best lag in frames (+ = video late)."""
    from tests.support.media_analysis import best_lag_correlation, envelope, mouth_series, speech_span

    async with AvatarClient(url) as client:
        await client.connect()
        await asyncio.sleep(0.5)
        await client.say("We were away a year ago. Why would you worry? Maybe we can all go home now.")
        await client.wait_speaking(True, timeout=5)
        await client.wait_speaking(False, timeout=30)
        env = envelope(client.received)
        span = speech_span(env)
        if span is None:
            return float("nan"), 0
        return best_lag_correlation(mouth_series(client.received, span[0] - 5, span[1] + 5), env)


@dataclass
class CapacityResult:
    sessions: int
    fps_min: float
    missing_frames: int
    max_gap_ms: float
    server_skipped: int
    speaking_ok: bool


async def _one_viewer(url: str, start_at: float, seconds: float) -> dict:
    async with AvatarClient(url, keep_images=False) as client:
        await client.connect()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await client.say(LONG)
        await client.wait_speaking(True, timeout=10)
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        speaking = await client.is_speaking()
        window = [v for v in client.received.video if start <= v.t <= end]
        idx = sorted({round(v.pts / 3600) for v in window})
        ts = [v.t for v in window]
        return {
            "fps": len(window) / (end - start),
            "missing": (idx[-1] - idx[0] + 1 - len(idx)) if idx else 0,
            "max_gap_ms": float(max(np.diff(ts)) * 1000) if len(ts) > 1 else float("inf"),
            "speaking": speaking,
        }


def _viewer_process(url: str, start_at: float, seconds: float, results: mp.Queue) -> None:
    """One viewer per process, as real viewers are: the measure is the server's, not
    one Python process decoding every stream under one GIL."""
    try:
        results.put(asyncio.run(_one_viewer(url, start_at, seconds)))
    except Exception as exc:  # reported as a failed viewer
        results.put({"error": repr(exc)})


async def measure_capacity(server: ServerProcess, n: int, seconds: float = 6.0) -> CapacityResult:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    skipped_before = server.stats().get("video_frames_skipped_total", 0)
    start_at = time.time() + 6.0  # every viewer connected before anyone speaks
    procs = [ctx.Process(target=_viewer_process, args=(server.url, start_at, seconds, results)) for _ in range(n)]
    for p in procs:
        p.start()
    loop = asyncio.get_running_loop()
    got = [await loop.run_in_executor(None, results.get, True, 90) for _ in procs]
    for p in procs:
        await loop.run_in_executor(None, p.join, 10)
    await asyncio.sleep(1.0)
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        log.warning("viewers failed: %s", errors)
        return CapacityResult(n, 0.0, -1, float("inf"), -1, False)
    skipped = server.stats().get("video_frames_skipped_total", 0) - skipped_before
    return CapacityResult(
        n,
        min(g["fps"] for g in got),
        sum(g["missing"] for g in got),
        max(g["max_gap_ms"] for g in got),
        skipped,
        all(g["speaking"] for g in got),
    )


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-bench-"))
    with ServerProcess(data_dir, "--max-sessions", str(max(args.sessions) + 1), "--log-level", "WARNING") as server:
        lat = await measure_latency(server.url, args.trials)
        r, lag = await measure_sync(server.url)
        def row(label: str, key: str, bar: str, signed: bool = False) -> list[str]:
            xs = lat[key]
            fmt = "{:+.0f} ms" if signed else "{:.0f} ms"
            worst = max(xs, key=abs) if xs else float("nan")
            return [label, fmt.format(_median(xs)), fmt.format(worst), bar]

        rows = [
            row("text -> first speaking audio packet arrives", "audio_pkt", "<= 250 ms"),
            row("text -> first speaking audio decoded (after aiortc's 80 ms buffer)", "audio", "<= 250 ms"),
            row("text -> first speaking video frame complete on the wire", "video_pkt", "<= 250 ms"),
            row("text -> first speaking video frame decoded (aiortc holds a frame 40 ms)", "video", "<= 250 ms"),
            row("interrupt -> silent audio packets arrive", "silence_pkt", "<= 100 ms"),
            row("interrupt -> silence decoded (after aiortc's 80 ms buffer)", "silence", "<= 100 ms"),
            row("A/V offset on the wire (video frame - audio packet, same media time)", "offset_pkt", "|x| <= 40 ms", True),
            row("A/V offset decoded by aiortc (its buffers: video 40 ms, audio 80 ms)", "offset", "|x| <= 40 ms", True),
            ["A/V offset by content (mouth vs envelope, best lag)", f"{lag * 40:+d} ms", f"r = {r:.2f}", "|x| <= 40 ms, r >= 0.6"],
        ]
        print_table(f"Real-time latency and sync at an aiortc client ({args.trials} trials each; median, worst)",
                    ["measure", "median", "worst", "bar"], rows)
        cap_rows = []
        held = 0
        for n in args.sessions:
            res = await measure_capacity(server, n)
            ok = res.fps_min >= 24.5 and res.missing_frames == 0 and res.server_skipped == 0 and res.speaking_ok
            held = n if ok else held
            gap = f"{res.max_gap_ms:.0f}"
            cap_rows.append([n, f"{res.fps_min:.1f}", res.missing_frames, res.server_skipped, gap, "yes" if ok else "no"])
            if not ok and n > held + 1:
                break
        print_table(
            "Speaking sessions at 512x512, 25 fps (CPU engine, every client on this machine)",
            ["sessions", "min fps at a client", "frames missing at clients", "frames skipped by server", "max frame gap ms", "real time"],
            cap_rows,
        )
        print(f"\nspeaking sessions held at 25 fps without dropped frames: {held}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 5, 6])
    p.add_argument("--data-dir", default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench realtime")
    add_arguments(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
