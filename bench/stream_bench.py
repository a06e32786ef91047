"""Streamed audio in (``/audio_stream``), measured at a WebRTC client (aiortc) on this machine.

A voice agent's TTS arrives as 24 kHz mono s16le in 20 ms pieces at real time (espeak
speech made through the project's own TTS, resampled to 24 kHz); the client that sends it
also receives the avatar over WebRTC and measures, per trial:

* first piece sent -> first speaking audio packet / first speaking video frame on the wire,
  and -> ``playback_started``
* heard whole: the speaking span heard vs the one sent (ms), and gaps inside the speech
  (silences over 60 ms that are not in the source)
* lip-sync: mouth opening (independent face mesh on the received frames) against the
  received audio's envelope, the correlation r at the best lag (``bench realtime``'s measure)
* ``clear_buffer`` mid-segment -> last loud audio packet at the client, and the
  ``playback_finished`` (``interrupted: true``) arrival

Run: ``python -m bench stream [--trials 3]`` (starts its own server with the CPU engine).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.realtime_bench import SILENT, video_arrival_at
from bench.table import print_table
from media.timing import FRAME_S, SAMPLE_RATE
from tests.support.client import AvatarClient
from tests.support.media_analysis import best_lag_correlation, envelope, mouth_series, speech_span
from tests.support.server_process import ServerProcess

log = logging.getLogger(__name__)

RATE = 24_000  # what the agent's TTS sends
PIECE_S = 0.02  # one piece: what LiveKit's and pipecat's TTS frames usually carry
PACKET_S = 0.02  # one Opus packet at the client
GAP_S = 0.06  # a silence longer than this inside the speech, not in the source, is a gap
TEXT = "We were away a year ago. Why would you worry? Maybe we can all go home now."


# ---- the audio sent ----
def espeak_speech(text: str = TEXT, rate: int = RATE) -> np.ndarray:
    """``text`` spoken by the project's espeak backend, as float mono at ``rate`` (runs its own
    event loop: call it from plain code or a thread)."""
    from tts.registry import create_tts

    async def synth() -> np.ndarray:
        tts = create_tts("espeak")
        return np.concatenate([pcm async for pcm in tts.stream(text)])

    pcm16 = asyncio.run(synth())
    x = pcm16.astype(np.float32) / 32768.0
    n = round(x.size * rate / SAMPLE_RATE)
    return np.interp(np.arange(n) * SAMPLE_RATE / rate, np.arange(x.size), x).astype(np.float32)


def sustained_speech(seconds: float, rate: int = RATE) -> np.ndarray:
    """A voiced buzz that never falls silent (load_bench's speech-like sound without the
    pauses between syllables): for the clear_buffer measure, so the cut lands in sound."""
    t = np.arange(round(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 12))
    syllables = 0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 2 * t))
    return (0.25 * voice / np.abs(voice).max() * syllables).astype(np.float32)


def to_pieces(x: np.ndarray, rate: int = RATE, piece_s: float = PIECE_S) -> list[bytes]:
    data = np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2").tobytes()
    size = round(piece_s * rate) * 2
    return [data[i : i + size] for i in range(0, len(data), size)]


def loud_frames(x: np.ndarray, rate: int = RATE, frame_s: float = PACKET_S) -> np.ndarray:
    """Per 20 ms frame: above the benches' silence threshold."""
    hop = round(rate * frame_s)
    n = x.size // hop
    return np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1)) > SILENT


# ---- the /audio_stream socket ----
class StreamSocket:
    """An /audio_stream client that keeps every event with its arrival time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, client: AvatarClient) -> StreamSocket:
        assert client.http is not None and client.session_id is not None
        ws = await client.http.ws_connect(f"{client.base_url}/audio_stream",
                                          params={"sessionid": client.session_id, "secret": client.secret or ""})
        return cls(ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append((time.monotonic(), json.loads(msg.data)))
                self._changed.set()

    async def send(self, body: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(body))

    async def until(self, kind: str, after: float, timeout: float = 20.0) -> tuple[float, dict[str, Any]]:
        """The first ``kind`` event that arrived after ``after``."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            for t, e in self.events:
                if t >= after and e.get("event") == kind:
                    return t, e
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} within {timeout} s: {[e for _t, e in self.events]}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def stream(self, pieces: list[bytes], rate: int = RATE, stop_after_s: float | None = None) -> tuple[float, float]:
        """Send ``pieces`` at real time, paced by the clock; stop early once ``stop_after_s``
        of audio went out. (first piece sent, seconds sent)."""
        started = time.monotonic()
        sent_s = 0.0
        for piece in pieces:
            await self.ws.send_bytes(piece)
            sent_s += len(piece) / (2 * rate)
            if stop_after_s is not None and sent_s >= stop_after_s:
                break
            delay = started + sent_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return started, sent_s

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# ---- one trial ----
@dataclass
class Trial:
    to_audio_ms: float = float("nan")  # first piece -> first speaking audio packet on the wire
    to_video_ms: float = float("nan")  # -> the video frame of that media time, complete on the wire
    to_started_ms: float = float("nan")  # -> playback_started
    duration_diff_ms: float = float("nan")  # speaking span heard - sent
    gaps: int = -1  # silences > 60 ms inside the speech heard that are not in the source
    gap_ms: list[float] = field(default_factory=list)
    r: float = float("nan")
    lag_ms: float = float("nan")  # + = video later than audio
    clear_to_last_loud_ms: float = float("nan")  # clear_buffer -> last loud audio packet (0 if none after)
    clear_to_finished_ms: float = float("nan")  # clear_buffer -> playback_finished(interrupted)
    clear_interrupted: bool = False
    clear_position_s: float = float("nan")
    pattern: str = ""  # the speech heard, a character per packet by media time ('#' loud, '.' silent, ' ' missing)


def gaps_not_in_source(heard: list[bool], source: np.ndarray, shift: int, longer_than: float = GAP_S) -> list[int]:
    """Lengths (packets) of the silent runs in ``heard`` (loud or not per 20 ms packet, from
    the first loud one) longer than ``longer_than`` seconds where the source, lined up by
    its first loud frame (index ``shift``), has sound: a pause the source has too is not a
    gap. A packet of slack either side of a run absorbs the codec and the frame grid."""
    out, start = [], None
    for k, loud in enumerate([*heard, True]):
        if not loud and start is None:
            start = k
        elif loud and start is not None:
            n, start_k = k - start, start
            start = None
            if n * PACKET_S <= longer_than + 1e-9:
                continue
            lo, hi = shift + start_k + 1, shift + k - 1
            if lo < hi and source[max(lo, 0) : min(hi, source.size)].any():
                out.append(n)
    return out


async def speech_trial(client: AvatarClient, sock: StreamSocket, speech: np.ndarray, trial: Trial) -> None:
    """One segment of real speech at real time: latency, heard whole, gaps, lip-sync."""
    received = client.received
    before = time.monotonic()
    t0, sent_s = await sock.stream(to_pieces(speech))
    await sock.send({"type": "end_of_segment"})
    t_started, _ = await sock.until("playback_started", before)
    await sock.until("playback_finished", before, timeout=sent_s + 20)
    await asyncio.sleep(0.5)  # the last packets and frames arrive

    packets = [p for p in received.audio_packets if p.t >= before]
    loud = [p for p in packets if p.rms > SILENT]
    if not loud:
        raise RuntimeError("no speech reached the client")
    first, last = loud[0], loud[-1]
    trial.to_audio_ms = (first.t - t0) * 1000
    t_video = video_arrival_at(received, first.pts / 48_000, packets=True)
    trial.to_video_ms = (t_video - t0) * 1000 if t_video is not None else float("nan")
    trial.to_started_ms = (t_started - t0) * 1000

    # heard whole: the speaking span at the client against the source's
    src_loud = loud_frames(speech)
    src_idx = np.flatnonzero(src_loud)
    src_first, src_last = src_idx[0] * PACKET_S, (src_idx[-1] + 1) * PACKET_S
    heard_first, heard_last = first.pts / 48_000, last.pts / 48_000 + PACKET_S
    trial.duration_diff_ms = ((heard_last - heard_first) - (src_last - src_first)) * 1000

    # gaps: silent runs inside the speech heard (a packet that never arrived counts as silence)
    by_slot = {round((p.pts - first.pts) / 960): p.rms > SILENT for p in packets if first.pts <= p.pts <= last.pts}
    heard = [by_slot.get(k, False) for k in range(max(by_slot) + 1)]
    trial.gap_ms = [n * PACKET_S * 1000 for n in gaps_not_in_source(heard, src_loud, int(src_idx[0]))]
    trial.gaps = len(trial.gap_ms)
    trial.pattern = "".join(" " if k not in by_slot else "#" if by_slot[k] else "." for k in range(len(heard)))

    # lip-sync, as bench realtime measures it, over this segment's frames
    env = envelope(received)
    start_i, stop_i = int(first.pts // (48_000 * FRAME_S)) - 5, int(last.pts // (48_000 * FRAME_S)) + 6
    span = speech_span(env[max(start_i, 0) : stop_i])
    if span is not None:
        s0, s1 = span[0] + max(start_i, 0), span[1] + max(start_i, 0)
        loop = asyncio.get_running_loop()
        mouth = await loop.run_in_executor(None, mouth_series, received, s0 - 5, s1 + 5)
        r, lag = best_lag_correlation(mouth, env)
        trial.r, trial.lag_ms = r, lag * FRAME_S * 1000
    for v in received.video:  # measured: let the images go
        v.image = None


async def clear_trial(client: AvatarClient, sock: StreamSocket, trial: Trial, seconds: float = 2.0,
                      clear_at_s: float = 1.0) -> None:
    """A segment cut by clear_buffer while it speaks: last loud packet and the event."""
    received = client.received
    before = time.monotonic()
    await sock.stream(to_pieces(sustained_speech(seconds)), stop_after_s=clear_at_s)
    await sock.until("playback_started", before)
    asked = time.monotonic()
    await sock.send({"type": "clear_buffer"})
    t_finished, finished = await sock.until("playback_finished", before)
    await asyncio.sleep(0.6)
    loud = [p for p in received.audio_packets if p.t >= before and p.rms > SILENT]
    trial.clear_to_last_loud_ms = max(0.0, (loud[-1].t - asked) * 1000) if loud else float("nan")
    trial.clear_to_finished_ms = (t_finished - asked) * 1000
    trial.clear_interrupted = bool(finished.get("interrupted"))
    trial.clear_position_s = float(finished.get("playback_position", float("nan")))
    for v in received.video:
        v.image = None


async def measure(url: str, trials: int, speech: np.ndarray | None = None) -> list[Trial]:
    """``trials`` rounds of (speech segment, cleared segment) over one session and socket."""
    speech = await asyncio.to_thread(espeak_speech) if speech is None else speech
    out: list[Trial] = []
    async with AvatarClient(url, keep_images=True, tap_packets=True) as client:
        await client.connect()
        sock = await StreamSocket.open(client)
        try:
            await sock.send({"type": "format", "sample_rate": RATE, "channels": 1})
            await asyncio.sleep(1.0)
            for _ in range(trials):
                trial = Trial()
                await speech_trial(client, sock, speech, trial)
                await asyncio.sleep(0.3)
                await clear_trial(client, sock, trial)
                await asyncio.sleep(0.3)
                out.append(trial)
                log.info("trial: %s", trial)
        finally:
            await sock.close()
    return out


# ---- the table ----
def _median(xs: list[float]) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def _worst(xs: list[float], low_is_worse: bool = False) -> float:
    xs = [x for x in xs if np.isfinite(x)]
    if not xs:
        return float("nan")
    return min(xs) if low_is_worse else max(xs, key=abs)


def table_rows(trials: list[Trial]) -> list[list[str]]:
    def row(label: str, xs: list[float], bar: str, fmt: str = "{:.0f} ms", low_is_worse: bool = False) -> list[str]:
        return [label, fmt.format(_median(xs)), fmt.format(_worst(xs, low_is_worse)), bar]

    col = lambda name: [getattr(t, name) for t in trials]  # noqa: E731
    return [
        row("first piece -> first speaking audio packet arrives", col("to_audio_ms"), "<= 250 ms"),
        row("first piece -> first speaking video frame complete on the wire", col("to_video_ms"), "<= 250 ms"),
        row("first piece -> playback_started arrives", col("to_started_ms"), ""),
        row("speech heard - speech sent (first to last loud 20 ms)", col("duration_diff_ms"), "|x| <= 40 ms", "{:+.0f} ms"),
        row("gaps in the speech heard (silences > 60 ms not in the source)", [float(t.gaps) for t in trials], "0", "{:.0f}"),
        row("lip-sync: r, mouth opening vs the received audio's envelope", col("r"), ">= 0.6", "{:.2f}", low_is_worse=True),
        row("lip-sync: lag at the best r (+ = video late)", col("lag_ms"), "|x| <= 40 ms", "{:+.0f} ms"),
        row("clear_buffer -> last loud audio packet arrives", col("clear_to_last_loud_ms"), "<= 100 ms"),
        row("clear_buffer -> playback_finished (interrupted) arrives", col("clear_to_finished_ms"), ""),
    ]


async def run(args: argparse.Namespace) -> list[Trial]:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="lipsync-bench-"))
    speech = await asyncio.to_thread(espeak_speech)
    with ServerProcess(data_dir, "--log-level", "WARNING") as server:
        trials = await measure(server.url, args.trials, speech)
    print_table(
        f"Streamed audio in (/audio_stream, 24 kHz mono, 20 ms pieces at real time, {speech.size / RATE:.1f} s of "
        f"espeak speech) at an aiortc client ({len(trials)} trials; median, worst)",
        ["measure", "median", "worst", "bar"], table_rows(trials),
    )
    interrupted = sum(t.clear_interrupted for t in trials)
    print(f"\nplayback_finished after clear_buffer said interrupted: {interrupted} of {len(trials)}; gaps heard "
          f"(ms): {[t.gap_ms for t in trials]}")
    return trials


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--data-dir", default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench stream")
    add_arguments(p)
    asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
