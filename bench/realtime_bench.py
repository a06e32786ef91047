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
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.server_process import ServerProcess
from bench.table import print_table
from server.client import AvatarClient, Received

log = logging.getLogger(__name__)

SILENT = 0.01
SHORT = "Hello, how are you today?"
LONG = " ".join(["This sentence goes on for a while so that several sessions speak together."] * 3)


def _audio_events(received: Received) -> list[tuple[float, float, float]]:
    """(arrival, media seconds, rms) per received audio frame."""
    return [(a.t, a.pts / a.rate, float(np.sqrt(np.mean(a.samples**2)))) for a in received.audio]


def first_speech(received: Received, after: float) -> tuple[float, float] | None:
    """Arrival time and media time of the first speaking audio frame that arrived after ``after``."""
    for t, media, rms in _audio_events(received):
        if t >= after and rms > SILENT:
            return t, media
    return None


def video_arrival_at(received: Received, media: float) -> float | None:
    """Arrival of the video frame that shows media time ``media``."""
    for v in received.video:
        if v.pts / 90_000 >= media - 0.02:
            return v.t
    return None


async def measure_latency(url: str, trials: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"audio": [], "video": [], "offset": [], "silence": []}
    async with AvatarClient(url, keep_images=False) as client:
        await client.connect()
        await asyncio.sleep(1.0)
        for _ in range(trials):
            sent = time.monotonic()
            await client.say(SHORT)
            await client.wait_speaking(False, timeout=20)
            await asyncio.sleep(0.3)
            hit = first_speech(client.received, sent)
            if hit is None:
                continue
            t_audio, media = hit
            t_video = video_arrival_at(client.received, media)
            out["audio"].append((t_audio - sent) * 1000)
            if t_video is not None:
                out["video"].append((t_video - sent) * 1000)
                out["offset"].append((t_video - t_audio) * 1000)
        for _ in range(trials):
            await client.say(LONG)
            await client.wait_speaking(True, timeout=10)
            await asyncio.sleep(1.0)
            asked = time.monotonic()
            await client.interrupt()
            await asyncio.sleep(0.6)
            events = [e for e in _audio_events(client.received) if e[0] >= asked]
            for k, (t, _media, rms) in enumerate(events):
                if rms <= SILENT and all(r <= SILENT for _t, _m, r in events[k : k + 5]):
                    out["silence"].append((t - asked) * 1000)
                    break
    return out


async def measure_sync(url: str) -> tuple[float, int]:
    """Correlation of mouth opening (independent face mesh on received frames) with the
    speech envelope, and the best lag in frames (+ = video late)."""
    from tests.media_analysis import best_lag_correlation, envelope, mouth_series, speech_span

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


async def measure_capacity(server: ServerProcess, n: int, seconds: float = 6.0) -> CapacityResult:
    clients = [AvatarClient(server.url, keep_images=False) for _ in range(n)]
    try:
        for c in clients:
            await c.connect()
        await asyncio.sleep(1.0)
        await asyncio.gather(*(c.say(LONG) for c in clients))
        await asyncio.gather(*(c.wait_speaking(True, timeout=10) for c in clients))
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        speaking = all(await asyncio.gather(*(c.is_speaking() for c in clients)))
        fps, missing, gaps = [], 0, []
        for c in clients:
            window = [v for v in c.received.video if start <= v.t <= end]
            fps.append(len(window) / (end - start))
            idx = sorted({round(v.pts / 3600) for v in window})
            if idx:
                missing += (idx[-1] - idx[0] + 1) - len(idx)
            ts = [v.t for v in window]
            gaps.append(max(np.diff(ts)) * 1000 if len(ts) > 1 else float("inf"))
        skipped = sum(server.stats()["video_frames_skipped"].values())
        return CapacityResult(n, min(fps), missing, max(gaps), skipped, speaking)
    finally:
        for c in clients:
            await c.close()
        await asyncio.sleep(1.0)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-bench-"))
    with ServerProcess(data_dir, "--max-sessions", str(max(args.sessions) + 1), "--log-level", "WARNING") as server:
        lat = await measure_latency(server.url, args.trials)
        r, lag = await measure_sync(server.url)
        rows = [
            ["text -> first speaking audio at client", f"{_median(lat['audio']):.0f} ms", f"{max(lat['audio'], default=float('nan')):.0f} ms", "<= 250 ms"],
            ["text -> first speaking frame at client", f"{_median(lat['video']):.0f} ms", f"{max(lat['video'], default=float('nan')):.0f} ms", "<= 250 ms"],
            ["interrupt -> silence at client", f"{_median(lat['silence']):.0f} ms", f"{max(lat['silence'], default=float('nan')):.0f} ms", "<= 100 ms"],
            ["A/V offset by arrival (video - audio)", f"{_median(lat['offset']):+.0f} ms", f"{max(lat['offset'], key=abs, default=float('nan')):+.0f} ms", "|x| <= 40 ms"],
            ["A/V offset by content (mouth vs envelope lag)", f"{lag * 40:+d} ms", f"r = {r:.2f}", "|x| <= 40 ms, r >= 0.6"],
        ]
        print_table(f"Real-time latency and sync at an aiortc client ({args.trials} trials each; median, worst)", ["measure", "median", "worst", "bar"], rows)
        cap_rows = []
        held = 0
        for n in args.sessions:
            res = await measure_capacity(server, n)
            ok = res.fps_min >= 24.5 and res.missing_frames == 0 and res.server_skipped == 0 and res.speaking_ok
            held = n if ok else held
            cap_rows.append([n, f"{res.fps_min:.1f}", res.missing_frames, res.server_skipped, f"{res.max_gap_ms:.0f}", "yes" if ok else "no"])
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
